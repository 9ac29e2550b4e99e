from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_run import GatewayRun, make_accounts
from tests.system import require_program


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator:
    """Make GatewayRun objects; every process they started is gone after the test."""
    for program in ("Xvnc", "vncpasswd", "apache2", "openbox", "xterm"):
        require_program(program)
    runs: list[GatewayRun] = []

    def make(count: int = 3, config_text: str = "", subdir: str = "gw") -> GatewayRun:
        directory = tmp_path / f"{subdir}{len(runs)}"
        directory.mkdir()
        run = GatewayRun(directory, make_accounts(count), config_text)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.kill_everything()


@pytest.fixture
def runs() -> Iterator[list[GatewayRun]]:
    """A list for the test to put its GatewayRun objects in; every one is cleaned up afterwards."""
    made: list[GatewayRun] = []
    for program in ("Xvnc", "vncpasswd", "apache2", "openbox", "xterm"):
        require_program(program)
    yield made
    for run in made:
        run.kill_everything()
