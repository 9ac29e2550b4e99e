"""The disk is full while the gateway writes state: a clear error, and what was written before is intact.

Each test mounts a small tmpfs of its own in a temporary directory (needs root) and fills it with a
filler file; it is unmounted in ``finally``. Nothing else of the machine is touched.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.common.files import atomic_write
from gateway.model.state import StateStore
from tests.gateway_run import GatewayRun, make_accounts, processes_mentioning
from tests.system import require_program, system_required

# Every test mounts a tmpfs (root) or starts a gateway.
pytestmark = pytest.mark.system


class SmallDisk:
    """A tmpfs of ``size`` bytes at ``path``; ``fill()`` takes every free byte."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = b"\0" * 65536
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 2]
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SmallDisk]:
    size = getattr(request, "param", "2m")
    if os.geteuid() != 0:
        message = "mounting a tmpfs needs root"
        if system_required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield SmallDisk(mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True, timeout=30)


def test_atomic_write_on_a_full_disk_fails_and_keeps_the_old_file(small_disk: SmallDisk) -> None:
    target = small_disk.path / "secrets" / "ws01.vncpasswd"
    atomic_write(target, b"old contents", mode=0o600)
    small_disk.fill()
    with pytest.raises(OSError) as raised:
        atomic_write(target, b"new contents " * 10_000, mode=0o600)
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old contents"
    assert (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind
    small_disk.free()
    atomic_write(target, b"new contents", mode=0o600)
    assert target.read_bytes() == b"new contents"


def test_state_store_on_a_full_disk_fails_clearly_and_keeps_the_state(small_disk: SmallDisk) -> None:
    path = small_disk.path / "gateway.db"
    store = StateStore(path)
    store.save_desktop("ws01", "local", {"xvnc": {"pid": 4242}})
    store.record_event("started", "ws01")
    small_disk.fill()
    try:
        # A write that needs new pages: the disk-full error from SQLite, and the transaction rolled back.
        with pytest.raises(sqlite3.OperationalError, match="disk is full|no space"):
            store.save_desktop("ws02", "local", {"xvnc": {"pid": 4343}, "padding": "x" * 500_000})
        with pytest.raises(sqlite3.OperationalError, match="disk is full|no space"):
            store.record_event("noise", "ws01", "y" * 500_000)
        assert {a: r.state for a, r in store.desktops().items()} == {"ws01": {"xvnc": {"pid": 4242}}}
    finally:
        store.close()
    # Another process (a restarted gateway) reads the same, intact state.
    reopened = sqlite3.connect(path)
    try:
        assert reopened.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert reopened.execute("SELECT account FROM desktops").fetchall() == [("ws01",)]
        assert [k for (k,) in reopened.execute("SELECT kind FROM events")] == ["started"]
    finally:
        reopened.close()
    small_disk.free()
    store = StateStore(path)
    try:
        store.save_desktop("ws02", "local", {"xvnc": {"pid": 4343}})
        assert sorted(store.desktops()) == ["ws01", "ws02"]
    finally:
        store.close()


@pytest.mark.system
def test_gateway_up_on_a_full_state_dir_exits_2_with_one_line_and_starts_nothing(
        small_disk: SmallDisk, tmp_path: Path) -> None:
    for program in ("Xvnc", "vncpasswd", "apache2", "openbox"):
        require_program(program)
    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", make_accounts(2))
    run.state_dir = small_disk.path / "state"
    # State from an earlier run: a database with a recorded event.
    run.state_dir.mkdir(mode=0o700)
    store = StateStore(run.state_dir / "gateway.db")
    store.record_event("earlier-run")
    store.close()
    before = (run.state_dir / "gateway.db").read_bytes()
    small_disk.fill()
    try:
        started = time.monotonic()
        result = subprocess.run(run.argv(), capture_output=True, text=True, timeout=60)
        assert time.monotonic() - started < 30
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if not line.startswith("Starting ")]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("gateway: error: no space left") and str(run.state_dir) in lines[0], lines
        assert "Traceback" not in result.stderr
        assert processes_mentioning(str(run.state_dir)) == []
        assert (run.state_dir / "gateway.db").read_bytes() == before
    finally:
        run.kill_everything()
        small_disk.free()
    # With space again, the same state dir works (and the earlier state is still there).
    store = StateStore(run.state_dir / "gateway.db")
    try:
        assert [kind for _, _, kind, _ in store.events()] == ["earlier-run"]
    finally:
        store.close()


@pytest.mark.parametrize("small_disk", ["32m"], indirect=True)
async def test_disk_full_while_running_keeps_every_desktop(small_disk: SmallDisk, tmp_path: Path) -> None:
    """A full state-dir disk while the gateway runs: the gateway and the healthy desktops carry on, and a
    desktop that must be restarted comes back: what a desktop needs (its user's home, its password file
    and X cookie in /run/workshop-gateway) is not on the gateway's state disk."""
    import json
    import signal
    import sys

    from gateway.common import rfb

    for program in ("Xvnc", "vncpasswd", "apache2", "openbox"):
        require_program(program)
    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", make_accounts(2), "restart:\n  max_attempts: 2\n")
    run.state_dir = small_disk.path / "state"
    crashed, healthy = run.accounts

    def rows() -> dict[str, dict]:
        result = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "--state-dir",
                                 str(run.state_dir)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return {r["account"]: r for r in json.loads(result.stdout)["desktops"]}

    def wait_for_state(account: str, state: str) -> dict:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            row = rows()[account]
            if row["state"] == state:
                return row
            time.sleep(0.3)
        raise AssertionError(f"{account} not {state}: {rows()[account]}")

    try:
        run.up()
        store = StateStore(run.state_dir / "gateway.db")
        xvnc = store.desktops()[crashed.id].state["xvnc"]["pid"]
        store.close()
        small_disk.fill()
        os.kill(xvnc, signal.SIGKILL)
        deadline = time.monotonic() + 40
        while (row := rows()[crashed.id])["restarts"] < 1 or row["state"] != "ready":
            assert time.monotonic() < deadline, f"{crashed.id} did not come back: {row}"
            time.sleep(0.3)
        await rfb.connect_websocket(run.ws_url(crashed), crashed.password, timeout_s=10)
        assert rows()[healthy.id]["state"] == "ready"
        await rfb.connect_websocket(run.ws_url(healthy), healthy.password, timeout_s=10)
        assert run.process is not None and run.process.poll() is None  # the gateway itself carries on

        small_disk.free()
        subprocess.run([sys.executable, "-m", "gateway", "desktop", "restart", crashed.id, "--state-dir",
                        str(run.state_dir)], check=True, capture_output=True, timeout=30)
        wait_for_state(crashed.id, "ready")
        await rfb.connect_websocket(run.ws_url(crashed), crashed.password, timeout_s=10)
    finally:
        small_disk.free()
        if run.process is not None and run.process.poll() is None:
            run.terminate(timeout_s=30)
        run.kill_everything()
