"""The end of the event where the gateway keeps it itself: the idle policy's event window.

Local and SSH desktops have no time limit of their own: their end is ``idle.event_end``, which
`gateway extend` moves. Here: the warning before that end appears as a window on the desktop's real
display (found with xdotool, as a participant would see it), and an extension is kept in the state
database, so that a gateway restarted, cleanly or after a crash, ends the event where the last one
would have (the limit of new Slurm jobs too, as long as the reservation it was given in lasts).
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.backends.slurm import SlurmBackend
from gateway.backends.slurm_client import SlurmClient
from gateway.common.proc import CommandResult
from gateway.model.config import IdleConfig, parse_config
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.model.tokens import Account
from gateway.supervisor.commands import DesktopCommands
from gateway.supervisor.extend import EventExtension
from gateway.supervisor.idle import IdleWatcher
from tests.gateway_run import GatewayRun, display_env, recorded_desktops
from tests.ssh_host import SshHost, ssh_accounts, ssh_host  # noqa: F401 - ssh_host is a fixture
from tests.system import message_windows, require_program, wait_for

#: How long a warning that is due at the first check may take to show (a desktop just became ready).
WARNING_WITHIN_S = 20.0


def moment(offset_s: float) -> str:
    """An ISO 8601 time ``offset_s`` from now, to the second, as idle.event_start/event_end take it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + offset_s))


def window_config(end_in_s: float, warnings: str) -> str:
    """An event window that began an hour ago and ends ``end_in_s`` from now, checked every second."""
    return (f"idle:\n  event_start: {moment(-3600)}\n  event_end: {moment(end_in_s)}\n"
            f"  end_warnings_minutes: {warnings}\n  check_interval_s: 1\n")


def audit(state_dir: Path, kind: str) -> list[tuple[str | None, str]]:
    store = StateStore(state_dir / "gateway.db")
    try:
        return [(account, detail) for _, account, k, detail in store.events() if k == kind]
    finally:
        store.close()


def extend(run: GatewayRun, duration: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "extend", duration, "--state-dir", str(run.state_dir)],
                          capture_output=True, text=True, timeout=120)


def window_end_in(line: str) -> datetime.datetime:
    """The "YYYY-MM-DD HH:MM" an event-window line of `gateway extend` names."""
    found = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d)", line)
    assert found, line
    return datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M")


# -- the extension in the state database (no desktop needed) ------------------------------------------------


async def _noop_notify(account: str, text: str) -> None:
    pass


async def _noop_act(account: str, action: str) -> str:
    return "done"


class _OneHourPartition(SlurmClient):
    """A cluster whose partition allows one hour per job; any other question to it fails the test."""

    async def partition_fields(self, name: str | None) -> dict[str, str]:
        return {"PartitionName": "desktop", "MaxTime": "01:00:00", "Default": "YES"}

    async def command(self, what: str, argv: Sequence[str], **options: object) -> CommandResult:
        raise AssertionError(f"unexpected Slurm command: {argv}")


def _event(tmp_path: Path, idle: IdleConfig, *, reservation: str) -> tuple[EventExtension, IdleWatcher, SlurmBackend]:
    """The gateway's extension with a real state database, as one `gateway up` makes it: a Slurm backend
    whose reservation is the organiser's (so extending it asks Slurm nothing), two desktops not ready."""
    config = parse_config(f"backend: slurm\nslurm:\n  time_limit_s: 1800\n  reservation: {reservation}\n")
    store = StateStore(tmp_path / "gateway.db")
    slots = {name: DesktopSlot(Account(name, "auto", f"/d/{name}", 6001 + i, 5901 + i, "secret12", i), backend="slurm")
             for i, name in enumerate(("ev01", "ev02"), start=1)}
    slurm = SlurmBackend(config, tmp_path, client=_OneHourPartition(timeout_s=5, submit_concurrency=1))
    slurm.reservation = reservation  # as open() leaves it
    idle = IdleWatcher(idle, slots, store, act=_noop_act, notify=_noop_notify, count_viewers=lambda s, c: 0,
                       input_known=False)
    return EventExtension({"slurm": slurm}, slots, DesktopCommands({}, slots), idle, store), idle, slurm


async def test_an_extension_is_taken_back_from_the_state_database_by_the_next_start(tmp_path: Path) -> None:
    window = IdleConfig(event_start=moment(-3600), event_end=moment(600))
    extension, idle, slurm = _event(tmp_path, window, reservation="event1")
    configured_end = idle.policy.window_end()
    assert configured_end is not None
    lines = await extension(600, None, "test")
    assert "new desktop jobs: time limit 0-00:40:00" in lines
    await extension(300, ["ev02"], "test")
    assert extension.store.event_state()["idle"]["extended_for"] == {"ev02": 900.0}
    extension.store.close()

    # The next `gateway up` on the same state dir.
    restarted, idle, slurm = _event(tmp_path, window, reservation="event1")
    assert idle.policy.window_end() == configured_end and slurm.extra_time_s == 0  # before restore()
    lines = restarted.restore()
    assert idle.policy.window_end() == configured_end + 600
    assert idle.policy.window_end("ev01") == configured_end + 600
    assert idle.policy.window_end("ev02") == configured_end + 900
    assert slurm.extra_time_s == 900  # the extension of ev02 alone was given to new jobs too, as before
    assert any("as extended before the restart" in line for line in lines), lines
    assert "new desktop jobs: time limit 0-00:45:00" in lines
    assert [d for a, d in _events(restarted.store) if d.startswith("after a restart:")] == \
        [f"after a restart: {line}" for line in lines]
    # Extended again after the restart: on top of what was restored.
    assert f"now ends {time.strftime('%Y-%m-%d %H:%M', time.localtime(configured_end + 660))}" in \
        " ".join(await restarted(60, None, "test"))
    restarted.store.close()


def _events(store: StateStore) -> list[tuple[str | None, str]]:
    return [(account, detail) for _, account, _, detail in store.events()]


async def test_an_extension_of_another_event_is_not_taken_back(tmp_path: Path) -> None:
    """The state dir serves the next event (another idle.event_end, another reservation): it starts
    from its config, and the log says why the old extension was left."""
    extension, _, _ = _event(tmp_path, IdleConfig(event_start=moment(-3600), event_end=moment(600)), reservation="day1")
    await extension(1200, None, "test")
    extension.store.close()
    next_window = IdleConfig(event_start=moment(-1800), event_end=moment(7200))
    restarted, idle, slurm = _event(tmp_path, next_window, reservation="day2")
    configured_end = idle.policy.window_end()
    lines = restarted.restore()
    assert idle.policy.window_end() == configured_end and slurm.extra_time_s == 0
    assert any("not applied again" in line for line in lines) and any("day1, not applied" in line for line in lines)
    restarted.store.close()


async def test_new_jobs_are_not_given_more_than_their_partition_allows(tmp_path: Path) -> None:
    """A job submitted beyond MaxTime would wait for ever: the limit of new jobs stays, and the line says
    what fits; the event window is extended all the same."""
    extension, idle, slurm = _event(tmp_path, IdleConfig(event_start=moment(-3600), event_end=moment(600)),
                                    reservation="event1")
    lines = await extension(3600, None, "test")
    assert slurm.extra_time_s == 0
    assert ("new desktop jobs: not extended: partition desktop allows at most 0-01:00:00 per job (MaxTime); "
            "0-00:30:00 +60 min would be 0-01:30:00, at most +30 min fits") in lines
    assert any(line.startswith("event window (idle policy): now ends") for line in lines)
    assert "new desktop jobs: time limit 0-01:00:00" in await extension(1800, None, "test")
    assert "new desktop jobs: not extended: partition desktop allows at most 0-01:00:00 per job (MaxTime); " \
           "0-01:00:00 +1 min would be 0-01:01:00, it is at that limit already" in await extension(60, None, "test")
    extension.store.close()


async def test_a_state_database_without_an_extension_restores_nothing(tmp_path: Path) -> None:
    extension, idle, slurm = _event(tmp_path, IdleConfig(event_start=moment(-3600), event_end=moment(600)),
                                    reservation="event1")
    end = idle.policy.window_end()
    assert extension.restore() == [] and idle.policy.window_end() == end and slurm.extra_time_s == 0
    # A record that can't be read (edited by hand, say) leaves the config's times, and says so.
    extension.store.save_event_state({"idle": {"event_end": "x", "extended_s": "soon"}})
    (line,) = extension.restore()
    assert line.startswith("idle: the extension saved before the restart is unreadable") and \
        idle.policy.window_end() == end
    extension.store.close()


# -- on a real display -----------------------------------------------------------------------------------


@pytest.mark.system
def test_a_local_desktop_is_warned_on_its_display_before_the_event_ends(gateway_factory) -> None:
    require_program("xmessage")
    # The event ends in 3 minutes and the warning is 5 minutes before: due at the first check.
    run: GatewayRun = gateway_factory(1, window_config(180, "[5]"))
    run.up(timeout_s=60)
    (account,) = run.accounts
    env = display_env(run.state_dir, account.id)
    assert wait_for(lambda: len(message_windows(env)) > 0, WARNING_WITHIN_S), run.text()
    (warned,) = [d for a, d in audit(run.state_dir, "end:warn") if a == account.id]
    assert "the end of the event" in warned, warned
    assert run.terminate() == 0


@pytest.mark.system
def test_an_ssh_desktop_is_warned_on_its_display_before_the_event_ends(ssh_host: SshHost, runs: list[GatewayRun],
                                                                        tmp_path: Path) -> None:
    require_program("xmessage")
    (account,) = ssh_accounts(1)
    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", [account], ssh_host.config_text() + window_config(180, "[5]"))
    runs.append(run)
    run.up(timeout_s=60)
    # The "host" is this machine through the test sshd: its display and X cookie are reachable from here.
    state = recorded_desktops(run.state_dir)[account.id].state
    cookie = Path(state["password_file"]).with_name(f"{account.id}.Xauthority")
    env = {"DISPLAY": f":{state['display']}", "XAUTHORITY": str(cookie)}
    assert wait_for(lambda: len(message_windows(env)) > 0, WARNING_WITHIN_S), run.text()
    (warned,) = [d for a, d in audit(run.state_dir, "end:warn") if a == account.id]
    assert "the end of the event" in warned, warned
    assert run.terminate() == 0


@pytest.mark.system
def test_an_extended_event_window_survives_a_restart_and_a_crash(gateway_factory) -> None:
    """Extended by 30 minutes, then stopped and started again, then killed and started again (adopting
    its desktop): each time the end it warns about and extends from is the extended one."""
    require_program("xmessage")
    # Ends in 10 minutes; a warning an hour before is due at once, and again whenever the end moves.
    run: GatewayRun = gateway_factory(1, window_config(600, "[60]"))
    run.up(timeout_s=60)
    (account,) = run.accounts
    assert wait_for(lambda: len(audit(run.state_dir, "end:warn")) == 1, WARNING_WITHIN_S), run.text()
    first = extend(run, "30m")
    assert first.returncode == 0, first.stdout + first.stderr
    (line,) = [line for line in first.stdout.splitlines() if line.startswith("event window")]
    extended_end = window_end_in(line)

    for how in ("SIGTERM", "SIGKILL"):
        assert run.process is not None
        if how == "SIGTERM":
            assert run.terminate() == 0
        else:
            adopted = recorded_desktops(run.state_dir)[account.id].state["xvnc"]
            os.kill(run.process.pid, signal.SIGKILL)
            run.process.wait()
        warned_before = len(audit(run.state_dir, "end:warn"))
        run.up(timeout_s=60)
        if how == "SIGKILL":  # the crashed gateway's desktop was adopted, not started again
            assert recorded_desktops(run.state_dir)[account.id].state["xvnc"] == adopted
        restored = [d for a, d in audit(run.state_dir, "extend") if d.startswith("after a restart: event window")]
        assert len(restored) == (1 if how == "SIGTERM" else 2), restored
        assert window_end_in(restored[-1]) == extended_end, (restored, extended_end)
        # The restarted gateway warns again (it does not know it warned), about the extended end.
        assert wait_for(lambda before=warned_before: len(audit(run.state_dir, "end:warn")) > before,
                        WARNING_WITHIN_S), run.text()
        detail = audit(run.state_dir, "end:warn")[-1][1]
        assert f"ends at {extended_end:%H:%M}" in detail, (detail, extended_end)

    more = extend(run, "5m")
    assert more.returncode == 0, more.stdout + more.stderr
    (line,) = [line for line in more.stdout.splitlines() if line.startswith("event window")]
    assert window_end_in(line) == extended_end + datetime.timedelta(minutes=5)
    assert run.terminate() == 0

