"""`gateway up` end to end on the local backend: real Xvnc, websockify, Apache; nothing mocked."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.common import rfb
from gateway.common.proc import process_start_time
from gateway.model.state import StateStore
from tests.gateway_run import (
    GatewayRun,
    handshake_until_ok,
    port_is_listening,
    processes_mentioning,
)
from tests.os_check import start_time, the_xvnc_on_port
from tests.system import free_port
from tests.secrets_check import passwords_in_command_lines

pytestmark = pytest.mark.system


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def recorded(run: GatewayRun) -> tuple[dict, dict]:
    store = StateStore(run.state_dir / "gateway.db")
    try:
        return store.desktops(), store.services()
    finally:
        store.close()


async def test_every_account_gets_a_desktop_through_apache_and_sigterm_cleans_up(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=3)
    seconds = run.up(timeout_s=30)
    assert seconds < 30

    for account in run.accounts:
        session = await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
        assert (session.width, session.height) == (1280, 800)
        assert session.name == account.id
        with pytest.raises(rfb.RfbAuthFailed):
            await rfb.connect_websocket(run.ws_url(account), "wrong-pw", timeout_s=10)
    # Wrong passwords don't lock the right one out (TigerVNC's blacklist is off).
    for _ in range(6):
        with pytest.raises(rfb.RfbAuthFailed):
            await rfb.connect_websocket(run.ws_url(run.accounts[0]), "nopenope", timeout_s=10)
    await rfb.connect_websocket(run.ws_url(run.accounts[0]), run.accounts[0].password, timeout_s=10)

    landing = fetch(run.url)
    for account in run.accounts:
        assert f'data-account="{account.id}"' in landing
        assert account.password not in landing
    assert '"state": "ready"' in fetch(run.url + "api/desktops")

    pids = processes_mentioning(str(run.state_dir))
    assert len(pids) >= 3 * 3 + 1  # Xvnc, session, websockify per account, and Apache
    _assert_no_secret_leaks(run, pids)

    started = time.monotonic()
    assert run.terminate(timeout_s=10) == 0
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 3
    while processes_mentioning(str(run.state_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(run.state_dir)) == []
    for pid in pids:
        assert process_start_time(pid) is None or not Path(f"/proc/{pid}").exists()
    ports = [run.listen_port] + [a.websocket_port for a in run.accounts] + [a.vnc_port for a in run.accounts]
    assert [p for p in ports if port_is_listening(p)] == []
    desktops, services = recorded(run)
    assert desktops == {} and services == {}


def _assert_no_secret_leaks(run: GatewayRun, pids: list[int]) -> None:
    passwords = [a.password.encode() for a in run.accounts]
    # Every process on this machine, not only those naming the state dir: websockify's command line
    # does not, and desktops may run as users of their own. (Short-lived processes: test_faults records
    # every exec of a whole cycle.)
    assert passwords_in_command_lines([a.password for a in run.accounts]) == []
    websockify = [pid for pid in _all_pids() if b"websockify" in _cmdline(pid)]
    assert len(websockify) >= len(run.accounts), "the check must see the proxies"
    for pid in pids:
        assert not any(p in _cmdline(pid) for p in passwords), f"password in command line of {pid}"
    for path in run.state_dir.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".conf", ".db", ".out"):
            data = path.read_bytes()
            assert not any(p in data for p in passwords), f"password in {path}"
    assert not any(p in run.output.read_bytes() for p in passwords)
    assert stat.S_IMODE(run.state_dir.stat().st_mode) == 0o700
    for secret in (run.state_dir / "secrets").iterdir():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600



def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_killed_proxy_and_desktop_are_restarted(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=2)
    run.up()
    victim, bystander = run.accounts
    desktops, services = recorded(run)

    # A websockify killed with SIGKILL is back within seconds, at the same path.
    proxy = services[f"proxy:{victim.id}"]
    os.kill(proxy.pid, signal.SIGKILL)
    started = time.monotonic()
    await handshake_until_ok(run.ws_url(victim), victim.password)
    proxy_back_s = time.monotonic() - started
    assert proxy_back_s < 5, proxy_back_s
    deadline = time.monotonic() + 5
    while recorded(run)[1][f"proxy:{victim.id}"].pid == proxy.pid and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert recorded(run)[1][f"proxy:{victim.id}"].pid != proxy.pid

    # Files in the workspace survive the X server being killed, and the desktop comes back.
    workspace = run.workspace(victim)
    (workspace / "notes.txt").write_text("my work")
    xvnc_pid = desktops[victim.id].state["xvnc"]["pid"]
    bystander_pid = desktops[bystander.id].state["xvnc"]["pid"]
    os.kill(xvnc_pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    await handshake_until_ok(run.ws_url(victim), victim.password, timeout_s=20)
    desktops_after, _ = recorded(run)
    assert desktops_after[victim.id].state["xvnc"]["pid"] != xvnc_pid
    assert (workspace / "notes.txt").read_text() == "my work"
    # The other participant never noticed.
    assert desktops_after[bystander.id].state["xvnc"]["pid"] == bystander_pid
    await rfb.connect_websocket(run.ws_url(bystander), bystander.password, timeout_s=5)
    assert run.terminate() == 0


async def test_gateway_killed_with_sigkill_readopts_desktops(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=2)
    run.up()
    # What the OS says, not the gateway's database: the X server of each desktop, by pid and start time.
    servers = {a.id: the_xvnc_on_port(a.vnc_port) for a in run.accounts}
    assert run.process is not None
    run.process.kill()
    run.process.wait()
    # The desktops outlive the gateway...
    for account in run.accounts:
        assert start_time(servers[account.id][0]) == servers[account.id][1]
    # ...and the next gateway keeps them, instead of starting new ones: the same processes serve them.
    run.up()
    for account in run.accounts:
        session = await handshake_until_ok(run.ws_url(account), account.password)
        assert session.name == account.id
        assert the_xvnc_on_port(account.vnc_port) == servers[account.id], "a new X server was started"
    after, _ = recorded(run)
    assert {a.id: after[a.id].state["xvnc"]["pid"] for a in run.accounts} == {k: v[0] for k, v in servers.items()}
    assert "desktop adopted" in run.text()
    assert run.terminate() == 0
    assert processes_mentioning(str(run.state_dir)) == []


def test_malformed_token_file_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    tokens = tmp_path / "bad.txt"
    tokens.write_text("ws01 localhost /desktop/ws01 6001 5901 abcdefg\n"
                      "ws02 localhost /desktop/ws01 6002 5902 abc\n")
    state = tmp_path / "state"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gateway", "up", str(tokens), "--state-dir", str(state),
                             "--listen", "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    # The short password is named with its place; any other problem found is on the same line 2
    # (its path repeats line 1's). Empty output is a failure: the organiser would be told nothing.
    assert f"{tokens}:2: vncpassword is too short (3 characters, at least 6)" in lines, result.stderr
    assert all(line.startswith(f"{tokens}:2: ") for line in lines), result.stderr
    assert "Traceback" not in result.stderr
    assert not state.exists()
    assert processes_mentioning(str(state)) == []


@pytest.mark.system
def test_a_token_file_that_participants_could_read_is_refused(tmp_path: Path) -> None:
    """Desktops run as the participants' own users: a token file they may read would give each of them
    every account's password. `up` refuses it, says how to fix it, and starts nothing."""
    if os.geteuid() != 0:
        pytest.skip("desktops run as users of their own only when the gateway runs as root")
    account = f"t{os.getpid() % 100000}"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{account} localhost /desktop/{account} {free_port()} {free_port()} abcdefgh\n")
    tokens.chmod(0o644)
    state = tmp_path / "state"
    result = subprocess.run([sys.executable, "-m", "gateway", "up", str(tokens), "--state-dir", str(state),
                             "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert (f"gateway: error: {tokens}: holds every account's password and other users may read it (mode 0644), "
            f"the participants' desktops among them; run: chmod 600 {tokens}") in result.stderr.splitlines()
    assert not state.exists() and processes_mentioning(str(state)) == []
    assert subprocess.run(["getent", "passwd", f"wg-{account}"], capture_output=True).returncode == 2


def test_port_in_use_is_refused_before_anything_starts(tmp_path: Path, gateway_factory) -> None:
    import socket

    run: GatewayRun = gateway_factory(count=2)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", run.accounts[1].vnc_port))
    blocker.listen()
    try:
        result = subprocess.run(run.argv(), capture_output=True, text=True, timeout=30)
    finally:
        blocker.close()
    assert result.returncode == 2, result.stderr
    # Line 3: the generated file starts with a comment line.
    assert f"{run.tokens}:3: vncport {run.accounts[1].vnc_port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert processes_mentioning(str(run.state_dir)) == []


def test_second_gateway_on_the_same_state_dir_is_refused(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    result = subprocess.run(run.argv(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "already running" in result.stderr
    assert run.terminate() == 0


def test_gateway_down_stops_a_running_gateway(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    result = subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(run.state_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert run.process is not None and run.process.wait(timeout=10) == 0
    assert processes_mentioning(str(run.state_dir)) == []


def test_gateway_down_after_a_crash_stops_the_leftovers(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    assert run.process is not None
    run.process.kill()
    run.process.wait()
    assert processes_mentioning(str(run.state_dir))
    result = subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(run.state_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert processes_mentioning(str(run.state_dir)) == []


async def test_private_apache_is_restarted(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    (account,) = run.accounts
    _, services = recorded(run)
    os.kill(services["apache"].pid, signal.SIGKILL)
    await handshake_until_ok(run.ws_url(account), account.password, timeout_s=20)
    _, after = recorded(run)
    assert after["apache"].pid != services["apache"].pid
    assert "apache exited" in run.text()
    assert run.terminate() == 0


def test_an_admin_password_short_enough_to_guess_is_refused(tmp_path: Path) -> None:
    """The admin page never refuses the right password (the organiser shares the venue's address with the
    participants), so a password the organiser chose must be too long to guess."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("ws01 localhost /desktop/ws01 6001 5901 abcdefgh\n")
    tokens.chmod(0o600)
    password = tmp_path / "admin.password"
    password.write_text("letmein\n")
    password.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text(f"admin:\n  password_file: {password}\n")
    state = tmp_path / "state"
    result = subprocess.run([sys.executable, "-m", "gateway", "up", str(tokens), "--config", str(config),
                             "--state-dir", str(state), "--listen", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"gateway: error: {password}: the admin password has 7 characters; use at least 12 "
        "(or delete the file: a random one is made at the next start)"], result.stderr
    assert not state.exists()
