"""Participants are strangers: each local desktop runs as a Unix user of its own and reaches nothing of
the gateway or of another participant. Everything here is tried from inside real desktops (typed into
their terminals with xdotool) or as the desktop's user (setpriv), never inferred from configuration."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.common import rfb
from gateway.backends.desktop_users import DesktopUser
from tests.gateway_run import GatewayRun, display_env, handshake_until_ok, make_accounts, processes_mentioning
from tests.os_check import proc_files
from tests.system import require_program
from tests.test_cockpit import admin_password, get

pytestmark = pytest.mark.system


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may pass through (unlike pytest's 0700 tmp dir), so that what keeps a
    desktop out of the gateway's files is the gateway's own permissions and nothing else."""
    path = Path(tempfile.mkdtemp(prefix="gw-isolation-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for registry in path.glob("**/users.json"):  # whatever ran here: its users go before its state dir
        GatewayRun.remove_users(registry.parent)
    shutil.rmtree(path, ignore_errors=True)


def start(runs: list[GatewayRun], directory: Path, count: int, config_text: str = "") -> GatewayRun:
    for program in ("xdotool", "xwininfo", "xdpyinfo", "setpriv"):
        require_program(program)
    directory.mkdir(mode=0o755)
    run = GatewayRun(directory, make_accounts(count), config_text)
    runs.append(run)
    run.up()
    return run


def as_user(user: DesktopUser, argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the desktop's user, the way anything started in that desktop runs."""
    return subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", *argv],
                          capture_output=True, text=True, timeout=30, **kwargs)


def terminal_window(x_env: dict[str, str], timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = subprocess.run(["xdotool", "search", "--onlyvisible", "--class", "xterm"], capture_output=True,
                               text=True, timeout=10, env=x_env).stdout.split()
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError("no terminal window on the desktop")


def type_in_terminal(x_env: dict[str, str], command: str) -> None:
    """Type ``command`` and Return into the desktop's terminal, as its participant would."""
    window = terminal_window(x_env)
    subprocess.run(["xdotool", "windowactivate", "--sync", window], env=x_env, timeout=10, check=False)
    subprocess.run(["xdotool", "windowfocus", "--sync", window], env=x_env, timeout=10, check=True)
    subprocess.run(["xdotool", "type", "--delay", "5", command], env=x_env, timeout=60, check=True)
    subprocess.run(["xdotool", "key", "Return"], env=x_env, timeout=10, check=True)


def wait_for_file(path: Path, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{path} was not written from inside the desktop")


def processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    return [pid for pid, status in proc_files("status")
            if f"\nUid:\t{uid}\t".encode() in status and b"State:\tZ" not in status]


def control_socket_reachable(user: DesktopUser, path: Path) -> subprocess.CompletedProcess[str]:
    code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); print('connected')"
    return as_user(user, [sys.executable, "-I", "-c", code])


async def test_each_desktop_is_its_own_user_and_reaches_nothing_of_the_gateway_or_the_others(
        runs: list[GatewayRun], open_dir: Path) -> None:
    run = start(runs, open_dir / "gw", 2)
    mine, other = run.accounts
    users = run.users()
    me, them = users[mine.id], users[other.id]
    assert me.uid != them.uid and not {me.uid, them.uid} & {0, os.geteuid()}, (me, them)
    assert pwd.getpwuid(me.uid).pw_name == me.name and me.name.endswith(mine.id)

    # The terminal inside the desktop says who it is.
    x_env = display_env(run.state_dir, mine.id)
    type_in_terminal(x_env, "id > ~/whoami.txt")
    assert wait_for_file(Path(me.home) / "whoami.txt").startswith(f"uid={me.uid}({me.name})")
    assert (Path(me.home).stat().st_uid, Path(me.home).stat().st_mode & 0o777) == (me.uid, 0o700)

    # Every process of the desktop (X server, window manager, terminal) runs as its user.
    commands = {Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].rsplit(b"/", 1)[-1]
                for pid in processes_of(me.uid)}
    assert {b"Xvnc", b"openbox", b"xterm"} <= commands, commands

    # Nothing of the gateway, nothing of the other participant.
    secrets_dir = run.state_dir / "secrets"
    them_runtime = Path(display_env(run.state_dir, other.id)["XAUTHORITY"]).parent
    forbidden = [run.tokens, run.state_dir / "gateway.db", secrets_dir / "admin.password",
                 secrets_dir / f"{other.id}.viewonly", run.state_dir / "logs" / "gateway.log",
                 Path(them.home), them_runtime / "vncpasswd", them_runtime / "Xauthority"]
    for path in forbidden:
        assert path.exists(), path
        result = as_user(me, ["cat", str(path)] if path.is_file() else ["ls", str(path)])
        assert result.returncode != 0 and "Permission denied" in result.stderr, (path, result)
    sockets = list(run.state_dir.glob("*.sock")) + list(run.state_dir.glob("**/*.sock"))
    assert sockets, "the control socket was not found"
    for path in sockets:
        result = control_socket_reachable(me, path)
        assert result.returncode != 0 and "connected" not in result.stdout, (path, result)

    # The other participant's display: no cookie, no connection (neither through the file system
    # socket nor the abstract one), while its own user opens it with its cookie.
    them_env = display_env(run.state_dir, other.id)
    own = as_user(them, ["xdpyinfo"], env=them_env)
    assert own.returncode == 0, own.stderr
    for display in (them_env["DISPLAY"], "unix" + them_env["DISPLAY"]):
        intruder = as_user(me, ["xdpyinfo"], env={"PATH": os.environ["PATH"], "DISPLAY": display,
                                                   "XAUTHORITY": x_env["XAUTHORITY"]})
        assert intruder.returncode != 0 and "unable to open display" in intruder.stderr, intruder

    # A process the participant detaches from the session still ends with the desktop.
    type_in_terminal(x_env, "setsid nohup sleep 3600 >/dev/null 2>&1 & echo started > ~/detached.txt")
    wait_for_file(Path(me.home) / "detached.txt")
    assert run.terminate() == 0
    assert processes_of(me.uid) == [] and processes_of(them.uid) == []
    assert processes_mentioning(str(run.state_dir)) == []


FORK_BOMB = """\
import os, subprocess
started = 0
for _ in range(400):
    try:
        subprocess.Popen(["sleep", "600"])
        started += 1
    except OSError:
        pass
with open(os.path.expanduser("~/bomb.txt"), "w") as out:
    out.write(f"{started}\\n")
"""


async def test_a_fork_bomb_in_one_desktop_leaves_the_others_and_the_gateway_working(
        runs: list[GatewayRun], open_dir: Path) -> None:
    limit = 64
    run = start(runs, open_dir / "gw", 2, f"desktop:\n  limits:\n    processes: {limit}\n")
    hostile, neighbour = run.accounts
    users = run.users()
    hostile_env = display_env(run.state_dir, hostile.id)
    # The participant's own script: it starts processes until the system refuses, and counts them.
    bomb = Path(users[hostile.id].home) / "bomb.py"
    bomb.write_text(FORK_BOMB)
    type_in_terminal(hostile_env, "python3 ~/bomb.py")
    started = int(wait_for_file(Path(users[hostile.id].home) / "bomb.txt", timeout_s=60))
    assert 30 < started < 400 and 30 < len(processes_of(users[hostile.id].uid)) <= limit, started

    # The neighbour opens a new terminal, and its desktop and the landing page answer as usual.
    neighbour_env = display_env(run.state_dir, neighbour.id)
    type_in_terminal(neighbour_env, "xterm & echo $! > ~/second.txt")
    second = int(wait_for_file(Path(users[neighbour.id].home) / "second.txt"))  # it started...
    deadline = time.monotonic() + 20
    # ...and its window shows (found by its pid: the shell in it retitles the window at its prompt).
    while not subprocess.run(["xdotool", "search", "--onlyvisible", "--pid", str(second)], capture_output=True,
                             text=True, timeout=10, env=neighbour_env).stdout.split():
        assert time.monotonic() < deadline, "the neighbour's new terminal did not open"
        await asyncio.sleep(0.2)
    await handshake_until_ok(run.ws_url(neighbour), neighbour.password, timeout_s=10)
    with urllib.request.urlopen(run.url, timeout=10) as response:
        assert response.status == 200
    status = gateway_command("status", "--state-dir", str(run.state_dir))
    assert f"per-user rlimits: {limit} processes" in status.stdout, status.stdout
    assert run.terminate() == 0
    assert processes_of(users[hostile.id].uid) == []


def gateway_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120)


def test_users_remove_deletes_the_events_users_and_keeps_their_files_from_a_later_uid(
        runs: list[GatewayRun], open_dir: Path) -> None:
    run = start(runs, open_dir / "gw", 1)
    (account,) = run.accounts
    user = run.users()[account.id]
    (Path(user.home) / "results.csv").write_text("42\n")
    assert gateway_command("users", "remove", "--state-dir", str(run.state_dir)).returncode == 2  # still running
    assert run.terminate() == 0
    removed = gateway_command("users", "remove", "--state-dir", str(run.state_dir))
    assert removed.returncode == 0, removed.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(user.name)
    kept = Path(user.home) / "results.csv"
    assert kept.read_text() == "42\n" and Path(user.home).stat().st_uid == 0  # no later uid inherits it
    shutil.rmtree(user.home)


def refused_at_start(runs: list[GatewayRun], run: GatewayRun) -> str:
    """Start ``run``'s gateway, which must exit 2 before starting anything; returns what it said."""
    runs.append(run)  # were it to start after all, the fixture stops it and removes its users
    run.start()
    assert run.process is not None
    status = run.process.wait(timeout=60)
    assert status == 2 and "Traceback" not in run.text(), run.text()
    assert not (run.state_dir / "gateway.db").exists()  # nothing started
    return run.text()


def test_an_existing_user_of_the_same_name_is_never_taken_over(runs: list[GatewayRun], open_dir: Path) -> None:
    accounts = make_accounts(1)
    taken = "tk" + os.urandom(3).hex() + "-"
    name = taken + accounts[0].id
    subprocess.run(["useradd", "--no-create-home", name], check=True, timeout=30)
    try:
        run = GatewayRun(open_dir, accounts, f"desktop:\n  user_prefix: {taken}\n")
        said = refused_at_start(runs, run)
        assert said.startswith(f"{run.tokens}:")
        assert f": account {accounts[0].id}: the user {name!r} already exists" in said
        assert pwd.getpwnam(name).pw_gecos == ""  # and the user is untouched
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], timeout=30)
        subprocess.run(["userdel", name], check=True, timeout=30)


@pytest.mark.parametrize("config_text, expected", [
    ("desktop:\n  users: gateway\n", "would run every participant's desktop as root"),
    ("desktop:\n  users: existing\n", ": account ws01: no user 'ws01' on this machine"),
])
def test_unsafe_or_impossible_user_choices_are_refused_before_anything_starts(
        runs: list[GatewayRun], open_dir: Path, config_text: str, expected: str) -> None:
    said = refused_at_start(runs, GatewayRun(open_dir, make_accounts(1), config_text))
    assert expected in said and len(said.strip().splitlines()) == 1, said


def test_a_system_account_never_runs_a_desktop(runs: list[GatewayRun], open_dir: Path) -> None:
    (account,) = make_accounts(1)
    daemon = type(account)("daemon", *[getattr(account, f) for f in ("vnc_host", "websocket_path", "websocket_port",
                                                                     "vnc_port", "password", "line")])
    said = refused_at_start(runs, GatewayRun(open_dir, [daemon], "desktop:\n  users: existing\n"))
    assert "the user 'daemon' is a system account" in said, said


def test_control_socket_is_the_gateways_alone(runs: list[GatewayRun], open_dir: Path) -> None:
    """Even with the state dir opened up by mistake, the socket itself admits nobody else."""
    run = start(runs, open_dir / "gw", 1)
    user = run.users()[run.accounts[0].id]
    run.state_dir.chmod(0o755)
    try:
        for path in run.state_dir.glob("**/*.sock"):
            result = control_socket_reachable(user, path)
            assert result.returncode != 0 and "connected" not in result.stdout, result
    finally:
        run.state_dir.chmod(0o700)
    with socket.socket(socket.AF_UNIX) as probe:  # the organiser still reaches it
        probe.connect(str(next(run.state_dir.glob("**/*.sock"))))
    assert run.terminate() == 0


VIEWER_CONFIG = re.compile(rb'<script type="application/json" id="viewer-config">(.*?)</script>')


def view_only_password_on_page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        match = VIEWER_CONFIG.search(response.read())
    assert match, "the watch page has no viewer settings"
    return str(json.loads(match.group(1))["password"])


async def authenticates(account_port: int, password: str, host: str = "127.0.0.1") -> bool:
    """Whether the desktop's VNC server at ``host``:``account_port`` accepts ``password``."""
    try:
        async with rfb.open_tcp(host, account_port, password, timeout_s=10):
            return True
    except rfb.RfbAuthFailed:
        return False


def share(run: GatewayRun, account_id: str, admin: str, minutes: float) -> str:
    code, body = get(run.url + f"admin/api/desktops/{account_id}/share", "admin", admin, method="POST",
                     body=json.dumps({"minutes": minutes}).encode(), content_type="application/json")
    assert code == 200, body
    return run.url + json.loads(body)["path"]


def revoke(run: GatewayRun, account_id: str, admin: str) -> int:
    """End every share link of the account (the admin page's button); how many there were."""
    code, body = get(run.url + f"admin/api/desktops/{account_id}/share/revoke", "admin", admin, method="POST",
                     body=b"{}", content_type="application/json")
    assert code == 200, body
    return int(json.loads(body)["revoked"])


async def test_a_share_link_that_expired_or_was_revoked_no_longer_opens_the_desktop(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    (account,) = run.accounts
    admin = admin_password(run)

    # A link valid for three seconds: its password works while it is valid...
    link = share(run, account.id, admin, minutes=0.05)
    handed_out = view_only_password_on_page(link)
    assert await authenticates(account.vnc_port, handed_out)
    # ...and not long after it expired, whoever kept the page can't watch any more.
    deadline = time.monotonic() + 20
    while await authenticates(account.vnc_port, handed_out):
        assert time.monotonic() < deadline, "the expired link's view-only password still works"
        await asyncio.sleep(0.5)
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(link, timeout=10)
    assert gone.value.code == 410

    # A revoked link: its password stops working at once; a new link works with the new password.
    revoked = share(run, account.id, admin, minutes=60)
    second = view_only_password_on_page(revoked)
    assert second != handed_out and await authenticates(account.vnc_port, second)
    assert revoke(run, account.id, admin) == 1
    assert not await authenticates(account.vnc_port, second)
    fresh = view_only_password_on_page(share(run, account.id, admin, minutes=60))
    assert await authenticates(account.vnc_port, fresh)
    assert await authenticates(account.vnc_port, account.password)  # the participant is never affected
    assert run.terminate() == 0
