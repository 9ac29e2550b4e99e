"""Fixtures shared by the test modules, and the session's bytecode cache for the programs tests start."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_run import GatewayRun, make_accounts
from tests.system import require_program

_PYCACHE_ENV = "PYTHONPYCACHEPREFIX"


def pytest_configure(config: pytest.Config) -> None:
    """With PYTHONDONTWRITEBYTECODE set, every `python -m gateway` a test starts (hundreds per run) compiles
    the whole package from source again. Give those processes a bytecode cache of this session's own
    instead, outside the source tree, so that the tree stays as clean as the setting wants it."""
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and _PYCACHE_ENV not in os.environ:
        del os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ[_PYCACHE_ENV] = tempfile.mkdtemp(prefix="gateway-tests-pycache-")
        config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(_PYCACHE_ENV), ignore_errors=True))


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
