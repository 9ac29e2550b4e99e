"""Fixtures shared by the test modules, and the session's bytecode cache for the programs tests start."""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


#: What marks a module that uses the one Slurm test cluster of scripts/test-slurm-cluster.
_USES_SLURM_CLUSTER = re.compile(r"require_slurm_cluster|slurm_event|\b(squeue|sbatch|scontrol|slurmctld|slurmd)\b")


@functools.cache
def _uses_slurm_cluster(module: str) -> bool:
    path = Path(module)
    return path.suffix == ".py" and path.is_file() and bool(_USES_SLURM_CLUSTER.search(path.read_text()))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With two workers (scripts/test runs `pytest -n 2`), the tests that use the Slurm test cluster run on one
    worker, one after another: some stop its controller, trace its slurmd, or make the event reservation
    on its one node, which a test on the other worker would disturb. Every other test goes to whichever
    worker is free.

    (A scheduler rather than `xdist_group` marks: pytest-xdist 3.8 loses those marks under pytest 9.2,
    pytest-dev/pytest-xdist#1386.)
    """
    from xdist.scheduler import LoadScopeScheduling

    class SlurmClusterTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm-cluster" if _uses_slurm_cluster(str(config.rootpath / module)) else nodeid

    return SlurmClusterTestsTogether(config, log)


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
