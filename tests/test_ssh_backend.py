"""backend: ssh against a real OpenSSH server on a loopback address (127.0.0.2), nothing mocked.

The sshd runs from a temporary directory with its own generated host key, user key, authorized_keys
and config; the machine's ~/.ssh and /etc/ssh keys are never read or written. The "VNC host" is this
machine seen through that sshd, so Xvnc listens on 127.0.0.2 and the desktop session script is at
the same path as here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.common import rfb
from gateway.backends.base import BackendError, Status
from gateway.backends.ssh import SshBackend
from gateway.backends.ssh_host import HostInfo
from gateway.backends.ssh_scripts import (
    WRITE_PASSWORD,
    parse_arrival,
    parse_launch,
    parse_probe,
    remote_command,
    script,
)
from gateway.backends.xauth import xauthority_shell
from gateway.model.config import parse_config
from tests.gateway_run import (
    GatewayRun,
    handshake_until_ok,
    make_accounts,
    recorded_desktops,
)
from tests.os_check import listening_addresses, the_xvnc_on_port
from tests.secrets_check import passwords_in_command_lines
from tests.ssh_host import HOST, SshHost, ssh_accounts, ssh_host  # noqa: F401 - ssh_host is a fixture
from tests.system import require_program

# -- pure parts --------------------------------------------------------------------------------

STAT = "4242 (Xvnc) S 1 4242 4242 0 -1 4194560 1000 0 0 0 5 3 0 0 20 0 1 0 87444 200000000 18000"


def test_probe_output_is_parsed() -> None:
    text = (f"boot 031cd480-f590\npid 4242\nstat {STAT}\ncmdline Xvnc\x1f-rfbauth\x1f/s/ws01.vncpasswd\x1f\n"
            "pid 77\nend\n")
    report = parse_probe(text)
    assert report.boot_id == "031cd480-f590"
    info = report.processes[4242]
    assert info is not None and info.start_time == 87444 and info.state == "S"
    assert info.argv == ("Xvnc", "-rfbauth", "/s/ws01.vncpasswd")
    assert report.processes[77] is None


def test_incomplete_probe_output_is_an_error_not_gone() -> None:
    with pytest.raises(ValueError):
        parse_probe(f"boot x\npid 4242\nstat {STAT}\n")  # cut off before "end": nothing is known


def test_launch_report_is_parsed() -> None:
    report = parse_launch(f"pid 4242\nboot b1\nstat {STAT}\ndisplay 7\nend\n")
    assert (report.pid, report.start_time, report.boot_id, report.display, report.failure) == (4242, 87444, "b1", 7, "")
    failed = parse_launch(f"pid 4242\nboot b1\nstat {STAT}\nexited\nlog (EE) Address already in use\n")
    assert failed.failure == "exited" and failed.log_tail == ("(EE) Address already in use",)


def test_the_host_writes_the_x_cookie_as_every_backend_does() -> None:
    assert xauthority_shell('"$xauthority.tmp"') in WRITE_PASSWORD  # one format: gateway/backends/xauth.py


def test_a_refresh_rewrites_the_password_file_and_leaves_the_x_cookie(tmp_path: Path) -> None:
    """The two password scripts, run here as a host runs them: the refresh replaces the password file (0600)
    and nothing else; a new cookie would lock the running session out of its display."""
    vncpasswd = require_program("vncpasswd")
    password_file, cookie = tmp_path / "secrets" / "ws01.vncpasswd", tmp_path / "secrets" / "ws01.Xauthority"
    subprocess.run(script("write-password", vncpasswd, password_file, cookie, tmp_path / "secrets"),
                   input="fullpass\nview1pw\n", text=True, check=True)
    first, cookie_bytes = password_file.read_bytes(), cookie.read_bytes()
    subprocess.run(script("refresh-password", vncpasswd, password_file), input="fullpass\nview2pw\n", text=True,
                   check=True)
    assert password_file.read_bytes() != first and len(password_file.read_bytes()) == len(first)
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert cookie.read_bytes() == cookie_bytes
    assert sorted(p.name for p in password_file.parent.iterdir()) == ["ws01.Xauthority", "ws01.vncpasswd"]
    failed = subprocess.run(script("refresh-password", "true", password_file), input="", text=True,
                            capture_output=True)
    assert failed.returncode != 0 and "wrote no password" in failed.stderr
    assert len(password_file.read_bytes()) == len(first)  # a failed refresh leaves the file Xvnc reads


def test_the_host_names_the_address_the_ssh_connection_arrived_at(tmp_path: Path) -> None:
    """PREPARE_HOST, run here as sshd runs it: the server address of SSH_CONNECTION ("client_ip client_port
    server_ip server_port") is where Xvnc listens with ssh.interface: auto."""
    def arrived(**env: str) -> str:
        result = subprocess.run(script("prepare-host", tmp_path / "state"), env={"PATH": os.environ["PATH"], **env},
                                capture_output=True, text=True, check=True)
        (line,) = [line for line in result.stdout.splitlines() if line.startswith("arrived")]
        return line.partition(" ")[2]

    assert parse_arrival(arrived(SSH_CONNECTION="192.0.2.7 50022 10.0.0.5 22")) == "10.0.0.5"
    assert parse_arrival(arrived(SSH_CONNECTION="2001:db8::7 50022 2001:db8::5 22")) == "2001:db8::5"
    assert arrived(SSH_CONNECTION="* * * *") == "*"  # words, never expanded as file names
    assert arrived() == ""  # not run by sshd
    for nothing in ("", "*", "vnc1.example.org", "10.0.0.5 22", "fe80::5%a b"):
        assert parse_arrival(nothing) is None
    assert parse_arrival("fe80::5%eth0") == "fe80::5%eth0"


def test_auto_listens_where_the_login_arrived_and_an_address_as_given(tmp_path: Path) -> None:
    account = ssh_accounts(1)[0]
    info = HostInfo("/remote/state", "boot1", "10.0.0.5")
    auto = SshBackend(parse_config("backend: ssh\n"), tmp_path)
    assert auto.listen_address(account, info) == "10.0.0.5"
    with pytest.raises(BackendError, match="set ssh.interface"):
        auto.listen_address(account, HostInfo("/remote/state", "boot1", None))  # never every address instead
    given = SshBackend(parse_config("backend: ssh\nssh:\n  interface: 192.0.2.1\n"), tmp_path)
    assert given.listen_address(account, info) == "192.0.2.1"


def test_remote_commands_are_quoted_argv() -> None:
    assert remote_command(["rm", "-f", "--", "a b", "$(reboot)"]) == "rm -f -- 'a b' '$(reboot)'"
    with pytest.raises(TypeError):
        remote_command("rm -rf /")  # type: ignore[arg-type]


# -- a real sshd -------------------------------------------------------------------------------


RESTART_FAST = "restart:\n  max_attempts: 2\n  backoff_initial_s: 0.2\n  backoff_max_s: 0.5\n"


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def desktop_states(run: GatewayRun) -> dict[str, dict]:
    data = fetch_json(run.url + "api/desktops")
    items = data["desktops"] if isinstance(data, dict) else data
    return {item["account"]: item for item in items}


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


# -- through a real `gateway up` ----------------------------------------------------------------

@pytest.mark.system
async def test_ssh_desktops_come_up_through_apache_restart_and_are_gone_after_gateway_down(
        ssh_host: SshHost, runs: list[GatewayRun], tmp_path: Path) -> None:
    remote = ssh_accounts(2)
    local = make_accounts(1, prefix="lo")
    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", [*remote, *local], ssh_host.config_text() + RESTART_FAST)
    runs.append(run)
    seconds = run.up(timeout_s=60)

    for account in [*remote, *local]:
        session = await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
        assert session.name == account.id
    with pytest.raises(rfb.RfbAuthFailed):
        await rfb.connect_websocket(run.ws_url(remote[0]), "wrong-pw", timeout_s=10)
    assert {k: v["state"] for k, v in desktop_states(run).items()} == {a.id: "ready" for a in [*remote, *local]}

    # One SSH connection for both accounts of the host.
    assert ssh_host.logins() == 1
    # The passwords are on no command line of this machine (which is also the "host").
    assert passwords_in_command_lines([a.password for a in [*remote, *local]]) == []
    secrets = ssh_host.remote_dir / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for account in remote:
        assert stat.S_IMODE((secrets / f"{account.id}.vncpasswd").stat().st_mode) == 0o600
    assert len(ssh_host.leftovers()) >= 2 * 2  # an Xvnc and a session per remote account

    # A remote Xvnc killed behind the gateway's back is found gone and started again.
    desktops = recorded_desktops(run.state_dir)
    victim, bystander = remote
    victim_pid = desktops[victim.id].state["xvnc"]["pid"]
    bystander_pid = desktops[bystander.id].state["xvnc"]["pid"]
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: recorded_desktops(run.state_dir).get(victim.id) is not None
               and recorded_desktops(run.state_dir)[victim.id].state["xvnc"]["pid"] != victim_pid, 30, "a new Xvnc")
    await handshake_until_ok(run.ws_url(victim), victim.password)
    restart_s = time.monotonic() - killed_at
    assert recorded_desktops(run.state_dir)[bystander.id].state["xvnc"]["pid"] == bystander_pid
    await rfb.connect_websocket(run.ws_url(bystander), bystander.password, timeout_s=5)

    # `gateway down` stops every desktop on the host; nothing of them is left.
    down = subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(run.state_dir)],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert run.process is not None and run.process.wait(timeout=10) == 0
    assert ssh_host.leftovers() == []
    assert list(secrets.iterdir()) == []
    assert recorded_desktops(run.state_dir) == {}
    print(f"\nssh: {len(remote)} remote + {len(local)} local ready in {seconds:.1f} s; "
          f"killed Xvnc back in {restart_s:.1f} s")


@pytest.mark.system
async def test_unreachable_host_fails_only_its_accounts_with_the_reason(
        ssh_host: SshHost, runs: list[GatewayRun], tmp_path: Path) -> None:
    ssh_host.stop()
    remote = ssh_accounts(1)
    local = make_accounts(1, prefix="lo")
    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", [*remote, *local], ssh_host.config_text() + RESTART_FAST)
    runs.append(run)
    run.up(timeout_s=60)
    states = desktop_states(run)
    assert states[local[0].id]["state"] == "ready"
    assert states[remote[0].id]["state"] == "failed"
    reason = states[remote[0].id]["reason"]
    assert f"cannot connect to {HOST} port {ssh_host.port}" in reason and "refused" in reason.lower(), reason
    session = await rfb.connect_websocket(run.ws_url(local[0]), local[0].password, timeout_s=10)
    assert session.name == local[0].id
    assert run.terminate(timeout_s=20) == 0


@pytest.mark.system
async def test_a_host_key_that_does_not_match_known_hosts_is_refused_with_a_message(
        ssh_host: SshHost, runs: list[GatewayRun], tmp_path: Path) -> None:
    impostor = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    ssh_host.write_known_hosts(impostor)  # known_hosts now expects another key for [127.0.0.2]:port
    remote = ssh_accounts(1)
    local = make_accounts(1, prefix="lo")
    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", [*remote, *local], ssh_host.config_text() + RESTART_FAST)
    runs.append(run)
    run.up(timeout_s=60)
    states = desktop_states(run)
    assert states[local[0].id]["state"] == "ready"
    assert states[remote[0].id]["state"] == "failed"
    reason = states[remote[0].id]["reason"]
    assert "host key" in reason and "does not match" in reason and str(ssh_host.known_hosts) in reason, reason
    assert ssh_host.logins() == 0 and ssh_host.leftovers() == []
    assert run.terminate(timeout_s=20) == 0


# -- the backend on its own ---------------------------------------------------------------------


def _backend(ssh_host: SshHost, tmp_path: Path, **overrides: object) -> SshBackend:
    config = parse_config("backend: ssh\n" + ssh_host.config_text(**overrides))
    return SshBackend(config, tmp_path / "state")


@pytest.mark.system
async def test_unknown_host_key_is_refused(ssh_host: SshHost, tmp_path: Path) -> None:
    ssh_host.known_hosts.write_text("")
    backend = _backend(ssh_host, tmp_path)
    account = ssh_accounts(1)[0]
    await backend.open([account])
    try:
        with pytest.raises(BackendError, match="host key of .* is unknown"):
            await backend.start(account)
    finally:
        await backend.close(final=True)
    assert ssh_host.logins() == 0


@pytest.mark.system
async def test_remote_arguments_arrive_exactly(ssh_host: SshHost, tmp_path: Path) -> None:
    require_program("Xvnc")
    backend = _backend(ssh_host, tmp_path)
    await backend.open([])
    hostile = ["a b", "$(touch /tmp/pwned)", "it's", '"q"', "x;y", "*"]
    try:
        result = await backend.hosts.exec(HOST, ["printf", "%s\\n", *hostile])
    finally:
        await backend.close(final=True)
    assert result.ok and result.stdout.splitlines() == hostile


@pytest.mark.system
async def test_by_default_xvnc_listens_only_on_the_address_the_gateway_reaches(ssh_host: SshHost, tmp_path: Path) -> None:
    """ssh.interface: auto. The test's sshd listens on 127.0.0.2 and the account's vnchost is 127.0.0.2: Xvnc
    listens there and nowhere else, so another address of the same machine (127.0.0.1) is refused."""
    for program in ("Xvnc", "vncpasswd", "openbox"):
        require_program(program)
    account = ssh_accounts(1)[0]
    backend = _backend(ssh_host, tmp_path)
    assert backend.settings.interface == "auto"
    await backend.open([account])
    state = None
    try:
        state = await backend.start(account)
        assert listening_addresses(account.vnc_port) == {HOST}  # not 0.0.0.0, nor ::
        await rfb.probe(HOST, account.vnc_port, timeout_s=5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", account.vnc_port), timeout=5).close()
    finally:
        if state is not None:
            await backend.stop(account, state)
        await backend.close(final=True)


@pytest.mark.system
async def test_poll_is_unknown_while_the_host_is_unreachable_and_a_new_gateway_adopts(
        ssh_host: SshHost, tmp_path: Path) -> None:
    for program in ("Xvnc", "vncpasswd", "openbox"):
        require_program(program)
    account = ssh_accounts(1)[0]
    backend = _backend(ssh_host, tmp_path, connect_attempts=1, connect_timeout_s=2, command_timeout_s=5)
    await backend.open([account])
    state = None
    try:
        state = await backend.start(account)
        assert (await backend.poll(account, state)).status is Status.RUNNING
        server = the_xvnc_on_port(account.vnc_port)  # (pid, start time), as the OS sees it
        await rfb.probe(HOST, account.vnc_port, timeout_s=5)
        assert passwords_in_command_lines([account.password]) == []

        # The host goes away: that is no evidence that the desktop is gone.
        ssh_host.stop()
        result = await backend.poll(account, state)
        assert result.status is Status.UNKNOWN and HOST in result.reason, result
        await rfb.probe(HOST, account.vnc_port, timeout_s=5)  # and indeed it still runs

        # Back again: the same backend reconnects; a new one (a restarted gateway) adopts the desktop.
        ssh_host.start()
        assert (await backend.poll(account, state)).status is Status.RUNNING
        await backend.close(final=False)
        backend = _backend(ssh_host, tmp_path)
        await backend.open([account])
        assert (await backend.adopt(account, state)).status is Status.RUNNING
        # Adopted means kept: the very same X server process, not a new one on the same port.
        assert the_xvnc_on_port(account.vnc_port) == server
        await rfb.probe(HOST, account.vnc_port, timeout_s=5)

        # The X server dies: positive evidence, GONE; stop then cleans up what is left.
        os.kill(state["xvnc"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (result := await backend.poll(account, state)).status is not Status.GONE:
            assert time.monotonic() < deadline, result
            await asyncio.sleep(0.2)
        await backend.stop(account, state)
        state = None
        assert ssh_host.leftovers() == []
        assert not (ssh_host.remote_dir / "secrets" / f"{account.id}.vncpasswd").exists()
    finally:
        if state is not None:
            await backend.stop(account, state)
        await backend.close(final=True)
