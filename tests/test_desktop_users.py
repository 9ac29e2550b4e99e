"""Who a desktop runs as: the refusals made before anything starts, and `gateway down --remove-users`."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.backends.desktop_users import check_desktop_users, uid_min
from gateway.model.config import parse_config
from gateway.model.errors import UserError
from tests.gateway_run import GatewayRun, make_accounts, processes_mentioning

pytestmark = pytest.mark.system


def live_processes_of(uid: int, settle_s: float = 5.0) -> list[int]:
    """The user's processes that are still running (a killed one may be a zombie for a moment, until
    init reaps it), after waiting up to ``settle_s`` for them to go."""
    deadline = time.monotonic() + settle_s
    while True:
        live = [int(pid) for pid, state in (line.split() for line in subprocess.run(
                    ["ps", "-o", "pid=,stat=", "-u", str(uid)], capture_output=True, text=True).stdout.splitlines())
                if not state.startswith("Z")]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.1)


def test_two_accounts_whose_users_share_a_uid_are_refused(tmp_path: Path) -> None:
    """Two names, one uid: each participant could read and kill the other's desktop."""
    if os.geteuid() != 0:
        pytest.skip("existing users are checked by a gateway running as root")
    first, second = make_accounts(2, prefix="su" + os.urandom(2).hex())
    uid = max(uid_min(), max(p.pw_uid for p in pwd.getpwall() if p.pw_uid < 60000) + 1)
    subprocess.run(["useradd", "--no-create-home", "-u", str(uid), first.id], check=True, timeout=30)
    try:
        subprocess.run(["useradd", "--no-create-home", "-o", "-u", str(uid), second.id], check=True, timeout=30)
        try:
            problems = check_desktop_users([first, second], parse_config("desktop:\n  users: existing\n"), tmp_path,
                                           tokens_path="tokens.txt", listen_host="127.0.0.1")
        finally:
            subprocess.run(["userdel", second.id], check=True, timeout=30)
    finally:
        subprocess.run(["userdel", first.id], check=True, timeout=30)
    assert [str(p) for p in problems] == [
        f"tokens.txt:{second.line}: account {second.id}: the user {second.id!r} has uid {uid}, like account "
        f"{first.id}'s user; each account needs a user of its own"]


@pytest.mark.parametrize("listen_host", ["0.0.0.0", "192.0.2.10", "gateway.example.org"])
def test_desktops_as_the_gateways_own_user_only_on_loopback(monkeypatch: pytest.MonkeyPatch,
                                                            listen_host: str) -> None:
    """`desktop.users: gateway` is a single-user trial: participants on a network get users of their own."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the trial mode is for a gateway that is not root
    config = parse_config("desktop:\n  users: gateway\n")
    assert check_desktop_users(make_accounts(1), config, Path("/nonexistent"), tokens_path="t",
                               listen_host="127.0.0.1") == []
    with pytest.raises(UserError, match=f"only for a single-user trial on 127.0.0.1, not on {listen_host}"):
        check_desktop_users(make_accounts(1), config, Path("/nonexistent"), tokens_path="t", listen_host=listen_host)


def test_down_with_remove_users_stops_the_event_and_deletes_exactly_its_users(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=2)
    run.up()
    users = run.users()
    assert len(users) == 2 and all(pwd.getpwnam(u.name).pw_uid == u.uid for u in users.values())
    result = subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(run.state_dir), "--config",
                             str(run.config), "--remove-users", "--delete-homes"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert run.process is not None and run.process.wait(timeout=30) == 0
    for user in users.values():
        with pytest.raises(KeyError):
            pwd.getpwnam(user.name)
        assert not Path(user.home).exists()
        assert live_processes_of(user.uid) == [], f"processes of {user.name} left"
    assert processes_mentioning(str(run.state_dir)) == []
    assert pwd.getpwnam("root").pw_uid == 0 and os.path.isdir("/home")  # nothing else was touched
