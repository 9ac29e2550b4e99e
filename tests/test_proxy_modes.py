"""The three proxy modes (per-account, shared, builtin) end to end, and their Apache rules."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import aiohttp
import aiohttp.web
import pytest

from gateway.common import rfb
from gateway.proxies.apache import render_apache_config
from gateway.model.config import Config, parse_config
from gateway.model.errors import InputError
from gateway.common.netstat import established_by_remote
from gateway.proxies.modes import make_proxy_mode
from gateway.proxies.relay import InputScanner
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.model.tokens import parse_tokens
from tests.gateway_run import GatewayRun, processes_mentioning
from tests.os_check import processes as all_processes
from tests.system import require_program, system_required

GOLDEN = Path(__file__).with_name("golden")
TOKENS = parse_tokens(
    "ws01 localhost /desktop/ws01 6001 5901 abcdefg\n"
    "ws010 localhost /desktop/ws010 6002 5902 abcdefg\n"
    "deep localhost /desktop/ws01/x 6003 5903 abcdefg\n"
)


# -- rendered rules ---------------------------------------------------------------------------


def rules(mode: str) -> str:
    config = parse_config(f"proxy:\n  mode: {mode}\n  shared_port: 7000\n")
    slots = {a.id: DesktopSlot(a) for a in TOKENS.accounts}
    proxy = make_proxy_mode(config, logs_dir=Path("/nonexistent"), runtime_dir=Path("/nonexistent"), slots=slots)
    return render_apache_config(config, proxy.routes(TOKENS.accounts), web_port=9999, layout=None,
                                listen="127.0.0.1:8080")


def normalised(text: str) -> str:
    """The proxy rules and comments (no local paths), random route tokens numbered in order."""
    seen: dict[str, str] = {}
    text = "".join(line + "\n" for line in text.splitlines() if line.startswith(("ProxyPass", "#")))
    return re.sub(r"token=([A-Za-z0-9_-]+)", lambda m: "token=" + seen.setdefault(m[1], f"TOKEN{len(seen) + 1}"),
                  text)


@pytest.mark.parametrize("mode", ["per-account", "shared", "builtin"])
def test_rules_match_the_golden_file(mode: str) -> None:
    text = normalised(rules(mode))
    golden = GOLDEN / f"apache-rules-{mode}.conf"
    if os.environ.get("GATEWAY_UPDATE_GOLDEN") == "1":
        # Rewriting the expectation would make the test pass whatever the rules are: never in CI,
        # and never counted as a pass (review the change with `git diff tests/golden/`).
        if os.environ.get("CI", "").lower() not in ("", "0", "false") or system_required():
            pytest.fail("GATEWAY_UPDATE_GOLDEN=1 is refused in CI (CI or GATEWAY_REQUIRE_SYSTEM=1 is set): "
                        "update the golden files locally and commit them", pytrace=False)
        changed = not golden.exists() or golden.read_text() != text
        golden.write_text(text)
        pytest.skip(f"{golden.name} {'rewritten' if changed else 'unchanged'} (GATEWAY_UPDATE_GOLDEN=1); "
                    "review it with git diff, then run without the variable")
    assert text == golden.read_text()


def test_shared_tokens_are_long_random_and_distinct() -> None:
    first = re.findall(r"token=([A-Za-z0-9_-]+) ", rules("shared"))
    second = re.findall(r"token=([A-Za-z0-9_-]+) ", rules("shared"))
    assert len(set(first)) == 3 and all(len(t) >= 32 for t in first)
    assert not set(first) & set(second)  # fresh secrets, not derived from the accounts
    assert not any(a.password in t or a.id in t for t in first for a in TOKENS.accounts)


def test_every_websocket_rule_has_the_same_parameters() -> None:
    # Apache shares one worker between routes to the same backend and keeps only the first
    # route's parameters (AH01146); identical parameters make that harmless.
    for mode in ("per-account", "shared", "builtin"):
        params = {line.split(" ", 3)[3] .replace(" nocanon", "")
                  for line in rules(mode).splitlines() if line.startswith("ProxyPass /desktop/")}
        assert params == {"retry=0 timeout=86400"}, mode


def test_apache_none_needs_the_builtin_relay() -> None:
    with pytest.raises(InputError, match="apache.mode: none needs proxy.mode builtin"):
        parse_config("apache:\n  mode: none\n")
    assert parse_config("apache:\n  mode: none\nproxy:\n  mode: builtin\n").apache.mode == "none"


def test_input_scanner_finds_keys_and_pointer_after_the_handshake() -> None:
    scanner = InputScanner()
    assert not scanner.feed(b"RFB 003.008\n" + b"\x02" + b"k" * 16 + b"\x01")
    assert not scanner.feed(bytes([2, 0, 0, 2]) + b"\0" * 8)  # SetEncodings, 2 encodings
    assert not scanner.feed(bytes([3, 1]) + b"\0" * 8)  # FramebufferUpdateRequest
    assert scanner.feed(bytes([5, 0, 0, 10, 0, 20]))  # PointerEvent
    assert not scanner.feed(bytes([4, 1, 0, 0]))  # half a KeyEvent...
    assert scanner.feed(bytes([0, 0, 0, 0x61]))  # ...completed
    lost = InputScanner()
    lost.feed(b"RFB 003.008\n\x13")  # VeNCrypt: not followed
    assert lost.feed(b"anything")


async def test_builtin_relay_pipes_bytes_and_counts_viewers_and_input() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.backends.base import Endpoint
    from gateway.proxies.relay import BuiltinRelay

    received = bytearray()
    closed = asyncio.Event()

    async def fake_vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        while data := await reader.read(1024):
            received.extend(data)
            writer.write(b"ok")
        writer.close()
        closed.set()

    server = await asyncio.start_server(fake_vnc, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    account = TOKENS.accounts[0]
    slots = {a.id: DesktopSlot(a) for a in TOKENS.accounts}
    relay = BuiltinRelay(Config(), slots)
    app = aiohttp.web.Application()
    app.router.add_routes(relay.web_routes(TOKENS.accounts))
    async with server, TestClient(TestServer(app)) as client:
        # Not started yet: refused, and nothing connects anywhere.
        response = await client.get(account.websocket_path, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                                     "Sec-WebSocket-Version": "13",
                                                                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert response.status == 503
        proxy = await relay.start(account, Endpoint("127.0.0.1", port))
        ws = await client.ws_connect(account.websocket_path, protocols=("binary",))
        assert (await ws.receive_bytes()) == b"RFB 003.008\n"
        assert slots[account.id].viewers == 1 and slots[account.id].last_input_at is None
        await ws.send_bytes(b"RFB 003.008\n\x01\x01")  # version, security None, ClientInit
        assert (await ws.receive_bytes()).startswith(b"ok")
        assert slots[account.id].last_input_at is None  # a handshake is not input
        await ws.send_bytes(bytes([5, 0, 0, 1, 0, 1]))  # PointerEvent
        await ws.receive_bytes()
        assert slots[account.id].last_input_at is not None
        assert bytes(received).endswith(bytes([5, 0, 0, 1, 0, 1]))
        assert (await client.get("/desktop/nobody")).status == 404
        await relay.stop(proxy)  # the desktop stops: its viewer is disconnected, both sides closed
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await asyncio.wait_for(closed.wait(), 5)
        for _ in range(50):
            if slots[account.id].viewers == 0:
                break
            await asyncio.sleep(0.05)
        assert slots[account.id].viewers == 0
        assert "viewers" not in slots[account.id].public()


# -- real gateways ----------------------------------------------------------------------------

MODES = {
    "per-account": "",
    "shared": "proxy:\n  mode: shared\n",
    "builtin": "proxy:\n  mode: builtin\n",
    "builtin-no-apache": "proxy:\n  mode: builtin\napache:\n  mode: none\n",
}


async def assert_no_vnc_connection_for_unknown_paths(run: GatewayRun) -> None:
    """Websockets to paths no account has are refused before any VNC server is contacted.

    Paths below an account's path, or with a query of the client's choosing (a guessed token),
    reach that account's own desktop or nothing: never another account's.
    """
    first = run.accounts[0]
    unknown = [f"{first.websocket_path}0", "/desktop/nobody", "/websockify", "/?token=guess", "/desktop/",
               "/desktop/%2e%2e/desktop/ws02"]
    before = {a.id: vnc_connections(a.vnc_port) for a in run.accounts}
    for path in unknown:
        with pytest.raises((aiohttp.ClientError, rfb.RfbError)):
            await rfb.connect_websocket(f"ws://127.0.0.1:{run.listen_port}{path}", first.password, timeout_s=5)
    assert {a.id: vnc_connections(a.vnc_port) for a in run.accounts} == before
    other = run.accounts[1]
    for suffix in ("/x", "/?token=guess", f"?token=guess&target={other.vnc_port}", "/../ws02"):
        try:
            session = await rfb.connect_websocket(f"ws://127.0.0.1:{run.listen_port}{first.websocket_path}{suffix}",
                                                  first.password, timeout_s=5)
        except (aiohttp.ClientError, rfb.RfbError):
            continue
        assert session.name == first.id, suffix


def websockify_listeners(run: GatewayRun) -> list[int]:
    """The websockify processes serving ``run``: command line `python -m websockify ...` naming one of
    its websocket ports or its state dir (the shared token file), whoever forked them (the gateway,
    or its per-account fork server); a connection's child (same command line, forked by a
    websockify) is not counted."""
    marks = [f"127.0.0.1:{a.websocket_port}".encode() for a in run.accounts] + [str(run.state_dir).encode()]
    processes: dict[int, tuple[bytes, int]] = {}
    for process in all_processes():
        try:
            processes[process.pid] = (Path(f"/proc/{process.pid}/cmdline").read_bytes(), process.ppid)
        except OSError:
            continue

    def is_websockify(cmdline: bytes) -> bool:
        return b"\0-m\0websockify\0" in cmdline

    return [pid for pid, (cmdline, parent) in processes.items()
            if is_websockify(cmdline) and any(mark in cmdline for mark in marks)
            and not is_websockify(processes.get(parent, (b"", 0))[0])]


def vnc_connections(port: int) -> int:
    """Established TCP connections to 127.0.0.1:port (the gateway's own counter, gateway.common.netstat)."""
    return established_by_remote()[("127.0.0.1", port)]


@pytest.mark.system
@pytest.mark.parametrize("mode", list(MODES))
async def test_right_password_through_each_mode_and_wrong_one_fails(gateway_factory, mode: str) -> None:
    run: GatewayRun = gateway_factory(count=2, config_text=MODES[mode])
    run.up(timeout_s=40)
    for account in run.accounts:
        session = await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
        assert session.name == account.id  # each path reaches its own desktop, not another's
        with pytest.raises(rfb.RfbAuthFailed):
            await rfb.connect_websocket(run.ws_url(account), "wrong-pw", timeout_s=10)
    await assert_no_vnc_connection_for_unknown_paths(run)
    apache_log = run.state_dir / "apache" / "logs" / "error.log"
    if mode != "builtin-no-apache":
        # The log Apache really wrote at start (AH00489, "resuming normal operations"; AH01146 is a
        # warning of that same start): no route lost its parameters to a shared worker.
        assert apache_log.is_file(), f"no Apache error log at {apache_log}"
        log_text = apache_log.read_text()
        assert "AH00489" in log_text, log_text[-2000:]
        assert "AH01146" not in log_text, log_text[-2000:]
    if mode == "shared":
        token_file = run.state_dir / "proxy" / "websockify-tokens"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert len(token_file.read_text().splitlines()) == 2
    if mode == "builtin-no-apache":
        assert not (run.state_dir / "apache").exists()
    assert run.process is not None
    websockify = websockify_listeners(run)
    expected = {"per-account": 2, "shared": 1}.get(mode, 0)
    assert len(websockify) == expected
    assert run.terminate() == 0
    assert processes_mentioning(str(run.state_dir)) == []


@pytest.mark.system
async def test_builtin_serves_https_itself_without_apache(gateway_factory, tmp_path: Path) -> None:
    openssl = require_program("openssl")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    run: GatewayRun = gateway_factory(count=1, config_text=MODES["builtin-no-apache"]
                                      + f"tls:\n  cert: {cert}\n  key: {key}\n")
    run.up(timeout_s=40)
    account = run.accounts[0]
    url = f"wss://127.0.0.1:{run.listen_port}{account.websocket_path}"
    session = await rfb.connect_websocket(url, account.password, timeout_s=10, ssl=False)
    assert session.name == account.id
    with pytest.raises(aiohttp.ClientError):  # plain http is not served
        await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=5)
    assert run.terminate() == 0


@pytest.mark.system
async def test_killed_shared_websockify_comes_back(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=2, config_text=MODES["shared"])
    run.up(timeout_s=40)
    store = StateStore(run.state_dir / "gateway.db")
    try:
        services = store.services()
    finally:
        store.close()
    proxies = {services[f"proxy:{a.id}"].pid for a in run.accounts}
    assert len(proxies) == 1  # one process serves both accounts
    os.kill(proxies.pop(), signal.SIGKILL)
    started = time.monotonic()
    for account in run.accounts:
        deadline = time.monotonic() + 20
        while True:
            try:
                session = await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=5)
                break
            except (OSError, rfb.RfbError, aiohttp.ClientError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert session.name == account.id
    assert time.monotonic() - started < 20
    assert run.terminate() == 0
    assert processes_mentioning(str(run.state_dir)) == []
