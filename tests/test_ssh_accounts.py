"""ssh.user: "{account}": each account logs in to its VNC host as the user named like it.

A real `gateway up` against the project's loopback test sshd (tests/ssh_host.py), configured here to
read each user's own ~/.ssh/authorized_keys; two OS users made for the test (useradd, removed with
userdel -r afterwards, their processes killed first, even when the test fails). Nothing mocked.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.common import rfb
from gateway.model.config import parse_config
from gateway.backends.desktop_users import kill_user_processes
from gateway.model.errors import InputError
from gateway.model.tokens import Account, generate_password
from tests.gateway_run import GatewayRun, recorded_desktops
from tests.os_check import processes
from tests.ssh_host import HOST, SshHost, require_sshd, free_port_on
from tests.system import free_port, require_program
from tests.test_cockpit import admin_password
from tests.test_isolation import authenticates, revoke, share, view_only_password_on_page

pytestmark = pytest.mark.system


@pytest.fixture
def per_user_ssh_host(tmp_path: Path) -> Iterator[SshHost]:
    """The test sshd, but reading each user's own ~/.ssh/authorized_keys (as a real host does)."""
    host = SshHost(tmp_path / "sshhost", require_sshd())
    shared_keys = f"AuthorizedKeysFile {host.directory / 'authorized_keys'}\n"
    text = host.config.read_text()
    assert shared_keys in text
    host.config.write_text(text.replace(shared_keys, "AuthorizedKeysFile .ssh/authorized_keys\n"))
    host.start()
    try:
        yield host
    finally:
        host.stop()


def _kill_processes_of(uid: int) -> None:
    asyncio.run(kill_user_processes(uid))


@pytest.fixture
def account_users(per_user_ssh_host: SshHost) -> Iterator[list[str]]:
    """Two fresh users whose authorized_keys hold the organiser's (the test's) key."""
    require_program("useradd")
    tag = random.randint(1000, 9999)
    names = [f"gws{tag}a", f"gws{tag}b"]
    created: list[str] = []
    public_key = per_user_ssh_host.user_key.with_suffix(".pub").read_text()
    try:
        for name in names:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True,
                           capture_output=True, timeout=30)
            created.append(name)
            # No password, but not locked ("!"): sshd without PAM refuses locked accounts even with a key.
            subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True, timeout=30)
            user = pwd.getpwnam(name)
            ssh_dir = Path(user.pw_dir) / ".ssh"
            ssh_dir.mkdir(mode=0o700)
            (ssh_dir / "authorized_keys").write_text(public_key)
            for path in (ssh_dir, ssh_dir / "authorized_keys"):
                os.chown(path, user.pw_uid, user.pw_gid)
        yield names
    finally:
        for name in created:
            _kill_processes_of(pwd.getpwnam(name).pw_uid)
            subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30)


def _ssh_as(host: SshHost, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """A command run over the OpenSSH client, logged in as ``user`` with the organiser's key."""
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(host.user_key), "-p", str(host.port), "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={host.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         f"{user}@{HOST}", "--", *argv],
        capture_output=True, text=True, timeout=30)


def test_account_user_needs_a_relative_state_dir() -> None:
    config = parse_config('backend: ssh\nssh:\n  user: "{account}"\n')
    assert config.ssh.user == "{account}" and config.ssh.state_dir == "workshop-gateway"
    with pytest.raises(InputError, match=r"<config>:4: ssh.state_dir: must be relative"):
        parse_config('backend: ssh\nssh:\n  user: "{account}"\n  state_dir: /srv/gateway\n')


async def test_each_account_logs_in_as_itself_and_owns_its_desktop_and_password_file(
        per_user_ssh_host: SshHost, account_users: list[str], runs: list[GatewayRun], tmp_path: Path) -> None:
    host = per_user_ssh_host
    accounts = [Account(name, HOST, f"/desktop/{name}", free_port(), free_port_on(HOST), generate_password(), i,
                        (("backend", "ssh"),)) for i, name in enumerate(account_users, start=1)]
    (tmp_path / "gw").mkdir()
    config = host.config_text(user='"{account}"', state_dir="workshop-gateway")
    run = GatewayRun(tmp_path / "gw", accounts, config)
    runs.append(run)
    seconds = run.up(timeout_s=60)
    print(f"\n{len(accounts)} per-account ssh desktops ready in {seconds:.1f} s")
    assert host.logins() == 2  # one connection per account's user

    desktops = recorded_desktops(run.state_dir)
    password_files = {}
    for account in accounts:
        session = await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
        assert session.name == account.id
        user = pwd.getpwnam(account.id)
        state = desktops[account.id].state
        assert state["user"] == account.id
        # Xvnc and the session run as the account's user, not as the gateway's (root).
        for process in ("xvnc", "session"):
            proc = Path(f"/proc/{state[process]['pid']}")
            assert proc.stat().st_uid == user.pw_uid, (account.id, process)
            status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
            assert status["Uid"].split() == [str(user.pw_uid)] * 4, (account.id, process)
        # Its password file is in the user's home, owned by it, 0600; its directory 0700.
        password_file = Path(state["password_file"])
        assert password_file.is_relative_to(user.pw_dir), password_file
        info = password_file.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.pw_uid, 0o600)
        assert stat.S_IMODE(password_file.parent.stat().st_mode) == 0o700
        password_files[account.id] = password_file

    # Each account's SSH login reads its own password file, never the other's.
    alice, bob = accounts
    assert _ssh_as(host, alice.id, "test", "-r", str(password_files[alice.id])).returncode == 0
    for reader, owner in ((alice, bob), (bob, alice)):
        attempt = _ssh_as(host, reader.id, "cat", str(password_files[owner.id]))
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt
        assert attempt.stdout == ""
        # Nor can it open the other's display (Xvnc -auth, the cookie readable by its owner only).
        display = f":{desktops[owner.id].state['display']}"
        intruder = _ssh_as(host, reader.id, "env", f"DISPLAY={display}", "xdpyinfo")
        assert intruder.returncode != 0 and "unable to open display" in intruder.stderr, intruder
    cookie = password_files[alice.id].with_name(f"{alice.id}.Xauthority")
    assert _ssh_as(host, alice.id, "env", f"DISPLAY=:{desktops[alice.id].state['display']}",
                   f"XAUTHORITY={cookie}", "xdpyinfo").returncode == 0  # its own user: yes

    # `gateway down`: both desktops and their password files are gone; nothing runs as the users.
    down = subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(run.state_dir)],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert run.process is not None and run.process.wait(timeout=10) == 0
    for account in accounts:
        assert not password_files[account.id].exists()
        uid = pwd.getpwnam(account.id).pw_uid
        deadline = time.monotonic() + 5  # SIGKILLed processes take a moment to leave
        while (left := _live_processes_of(uid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert left == [], (account.id, left)


def _live_processes_of(uid: int) -> list[str]:
    """Command names of the processes (not zombies) running as ``uid``."""
    found = []
    for process in processes():
        try:
            owner = Path(f"/proc/{process.pid}").stat().st_uid
        except OSError:
            continue
        if owner == uid and process.state != "Z":
            found.append(process.comm)
    return found


async def test_a_revoked_share_link_no_longer_opens_the_running_desktop_on_its_host(
        per_user_ssh_host: SshHost, account_users: list[str], runs: list[GatewayRun], tmp_path: Path) -> None:
    """Revoking a share link rewrites the password file of the running Xvnc on the host, over the account's own
    login: the link's view-only password is refused at once; the X cookie, and with it the session, stay."""
    host = per_user_ssh_host
    name = account_users[0]
    account = Account(name, HOST, f"/desktop/{name}", free_port(), free_port_on(HOST), generate_password(), 1,
                      (("backend", "ssh"),))
    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", [account], host.config_text(user='"{account}"', state_dir="workshop-gateway"))
    runs.append(run)
    run.up(timeout_s=60)
    state = recorded_desktops(run.state_dir)[name].state
    password_file = Path(state["password_file"])
    cookie = password_file.with_name(f"{name}.Xauthority")
    cookie_bytes = cookie.read_bytes()
    admin = admin_password(run)

    handed_out = view_only_password_on_page(share(run, name, admin, minutes=60))
    assert await authenticates(account.vnc_port, handed_out, HOST)
    assert revoke(run, name, admin) == 1
    # The revoke answers once the file is rewritten, and Xvnc reads it at every authentication.
    assert not await authenticates(account.vnc_port, handed_out, HOST)
    assert await authenticates(account.vnc_port, account.password, HOST)  # the participant is never affected
    fresh = view_only_password_on_page(share(run, name, admin, minutes=60))
    assert fresh != handed_out and await authenticates(account.vnc_port, fresh, HOST)

    # Written by the account's own login (its user's 0600 file); the cookie is the one the session has.
    info = password_file.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (pwd.getpwnam(name).pw_uid, 0o600)
    assert cookie.read_bytes() == cookie_bytes
    assert _ssh_as(host, name, "env", f"DISPLAY=:{state['display']}", f"XAUTHORITY={cookie}",
                   "xdpyinfo").returncode == 0
    assert recorded_desktops(run.state_dir)[name].state["xvnc"] == state["xvnc"]  # the same Xvnc, never restarted
    assert run.terminate(timeout_s=60) == 0
