"""The front door holds against one hostile laptop (issue 13): TLS on public addresses, tunnels per
account capped in every proxy mode, slow and silent clients cut off, VNC password guessing slowed
down, and X-Forwarded-For believed only from the gateway's own Apache.

Everything runs on the real components: `gateway up` in a subprocess with TigerVNC, websockify and
the private Apache with mod_qos and mod_reqtimeout. One gateway per proxy mode serves the whole module.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.common import rfb
from gateway.proxies.apache import ApacheLayout, render_apache_config
from gateway.model.config import parse_config, public_listen_problem
from gateway.common.frontdoor import GuessBackoff
from gateway.common.ratelimit import BoundedTable
from gateway.proxies.modes import make_proxy_mode
from gateway.model.status import DesktopSlot
from gateway.model.tokens import Account, format_tokens, parse_tokens
from tests.gateway_run import GatewayRun, make_accounts, port_is_listening, processes_mentioning
from tests.system import free_port, require_program

MAX_VIEWERS = 4  # the default of proxy.max_viewers_per_account
AUTH_TIMEOUT_S = 3  # proxy.auth_timeout_s in these tests (default 20)
TOO_MANY = "Too many viewers are open for this desktop"


# -- TLS on public addresses ------------------------------------------------------------------------


def gateway_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True, text=True, timeout=60)


def refused_up(tokens: Path, state: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`gateway up` that is expected to refuse at once; if it starts instead, it is stopped again."""
    argv = [sys.executable, "-m", "gateway", "up", str(tokens), "--state-dir", str(state), *options]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate(timeout=60)
        raise AssertionError(f"gateway up started instead of refusing:\n{stderr}") from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "[::]:{port}"])
def test_public_listen_without_tls_is_refused_before_anything_starts(tmp_path: Path, listen: str) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens(make_accounts(1)))
    tokens.chmod(0o600)
    port = free_port()
    state = tmp_path / "state"
    result = refused_up(tokens, state, "--listen", listen.format(port=port))
    assert result.returncode == 2, result
    (line,) = result.stderr.splitlines()  # one line, that says how to fix it
    assert line.startswith("gateway: error: listen ") and "without TLS" in line
    assert "tls.cert and tls.key" in line and "tls.terminated_by_proxy" in line and "127.0.0.1" in line
    assert not state.exists() and not port_is_listening(port) and processes_mentioning(str(state)) == []

    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    result = gateway_cli("systemd", "install", str(tokens.resolve()), "--listen", "0.0.0.0:8080",
                         "--unit-dir", str(unit_dir))
    assert result.returncode == 2 and "without TLS" in result.stderr and list(unit_dir.iterdir()) == []


def test_tls_terminated_in_front_must_be_stated_with_its_https_url(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens(make_accounts(1)))
    config = tmp_path / "gateway.yaml"
    config.write_text("tls:\n  terminated_by_proxy: true\npublic_url: http://desktops.example.org/\n")
    result = refused_up(tokens, tmp_path / "state", "--config", str(config), "--listen", f"0.0.0.0:{free_port()}")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"{config}:2: tls.terminated_by_proxy: needs public_url: the https:// URL "
                                     "of the proxy in front")

    behind_proxy = parse_config("tls:\n  terminated_by_proxy: true\npublic_url: https://desktops.example.org/\n")
    with_cert = parse_config("tls:\n  cert: /c.pem\n  key: /k.pem\n")
    system_with_cert = parse_config("tls:\n  cert: /c.pem\n  key: /k.pem\napache:\n  mode: system\n")
    plain = parse_config("")
    for listen in ("127.0.0.1:8080", "127.0.0.2:8080", "localhost:8080", "[::1]:8080"):
        assert public_listen_problem(plain, listen) is None, listen
    for listen in ("0.0.0.0:8080", "192.0.2.10:443", "desktops.invalid:443"):
        assert public_listen_problem(plain, listen) is not None, listen
        assert public_listen_problem(behind_proxy, listen) is None
        assert public_listen_problem(with_cert, listen) is None
        # The site's Apache terminates TLS in system mode; the gateway's own port serves plain HTTP.
        assert public_listen_problem(system_with_cert, listen) is not None


# -- the generated Apache configuration ---------------------------------------------------------------


TOKENS = parse_tokens("ws01 localhost /desktop/ws01 6001 5901 abcdefg\n"
                      "ws010 localhost /desktop/ws010 6002 5902 abcdefg\n"
                      "deep localhost /desktop/ws01/x 6003 5903 abcdefg\n")


def rendered(mode: str, tmp_path: Path | None, extra: str = "") -> str:
    config = parse_config(f"proxy:\n  mode: {mode}\n{extra}")
    slots = {a.id: DesktopSlot(a) for a in TOKENS.accounts}
    proxy = make_proxy_mode(config, logs_dir=Path("/nonexistent"), runtime_dir=Path("/nonexistent"), slots=slots)
    layout = None
    if tmp_path is not None:
        layout = ApacheLayout(tmp_path / mode)
        (layout.root / "logs").mkdir(parents=True)
        layout.runtime_dir.mkdir()
    text = render_apache_config(config, proxy.routes(TOKENS.accounts), web_port=9999, layout=layout,
                                listen="127.0.0.1:18099")
    if layout is not None:
        layout.config_file.write_text(text)
    return text


@pytest.mark.system
@pytest.mark.parametrize("mode", ["per-account", "shared", "builtin"])
def test_private_apache_caps_tunnels_and_times_out_slow_requests(tmp_path: Path, mode: str) -> None:
    apache2 = require_program("apache2")
    text = rendered(mode, tmp_path, "  max_viewers_per_account: 3\n")
    assert re.search(r"^RequestReadTimeout header=10-20,MinRate=500 body=20,MinRate=500$", text, re.M)
    assert re.search(r'^RequestHeader set X-Gateway-Front "[A-Za-z0-9_-]{40,}"$', text, re.M)
    limits = re.findall(r"^    QS_LocRequestLimit (\S+) (\d+)$", text, re.M)
    if mode == "builtin":  # the relay counts and refuses itself
        assert limits == [] and "qos_module" not in text
    else:
        assert sorted(limits) == sorted((a.websocket_path, "3") for a in TOKENS.accounts)
        assert re.search(r'^LoadModule qos_module "\S+/mod_qos.so"$', text, re.M)
    result = subprocess.run([apache2, "-t", "-f", str(tmp_path / mode / "httpd.conf")], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "Syntax OK" in result.stderr, result.stderr


def test_system_mode_rules_cap_tunnels_where_the_site_loads_mod_qos() -> None:
    text = rendered("per-account", None)
    block = text[text.index("<IfModule qos_module>"):text.index("</IfModule>", text.index("<IfModule qos_module>"))]
    assert block.count("QS_LocRequestLimit ") == 3 and f"{MAX_VIEWERS}\n" in block
    assert "RequestReadTimeout" not in text  # the site's server settings stay the site's
    # The front door's secret is set only for the gateway's own path, not for the site's other servers.
    assert re.search(r'^<Location "/">\n    RequestHeader set X-Gateway-Front "[A-Za-z0-9_-]{40,}"\n</Location>$',
                     text, re.M), text
    assert text.count("X-Gateway-Front") == 1


def test_failure_tables_are_bounded_and_backoff_is_capped() -> None:
    table: BoundedTable[str, int] = BoundedTable(3)
    for i in range(10):
        table.get(f"10.0.0.{i}", lambda: 0)
    assert len(table) == 3
    now = [1000.0]
    backoff = GuessBackoff(first_s=0.5, max_s=4.0, limit=100, clock=lambda: now[0])
    key = ("ws01", "192.0.2.1")
    assert backoff.reserve(key) == 0.0
    for _ in range(8):
        backoff.failed(key)
    assert backoff.delay(8) == 4.0  # capped: slower, never locked out
    waits = [backoff.reserve(key) for _ in range(3)]  # parallel attempts queue up one after the other
    assert waits[0] <= 4.0 and waits[1] - waits[0] == 4.0 and waits[2] - waits[1] == 4.0
    assert backoff.reserve(("ws01", "192.0.2.2")) == 0.0  # another address behind the same venue is not slowed
    backoff.succeeded(key)
    assert backoff.reserve(key) == 0.0
    for i in range(1000):
        backoff.failed(("ws01", f"198.51.100.{i}"))
    assert len(backoff) <= 100
    now[0] += 601  # quiet keys are forgotten
    backoff.reserve(("ws02", "x"))
    assert len(backoff) == 1


# -- the running gateway, one per proxy mode -----------------------------------------------------------


@dataclass
class Front:
    run: GatewayRun
    mode: str

    @property
    def accounts(self) -> list[Account]:
        return self.run.accounts

    def url(self, account: Account) -> str:
        return self.run.ws_url(account)

    def web_port(self) -> int:
        """The gateway's own port behind the private Apache (a client could try it directly)."""
        text = (self.run.state_dir / "apache" / "httpd.conf").read_text()
        return int(re.search(r"^ProxyPass / http://127\.0\.0\.1:(\d+)/", text, re.M).group(1))


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Front]]:
    for program in ("Xvnc", "vncpasswd", "apache2", "openbox", "xterm"):
        require_program(program)
    started: dict[str, Front] = {}

    def get(mode: str) -> Front:
        if mode not in started:
            directory = tmp_path_factory.mktemp(f"front-{mode}")
            config = f"proxy:\n  mode: {mode}\n  auth_timeout_s: {AUTH_TIMEOUT_S}\n"
            run = GatewayRun(directory, make_accounts(3), config)
            started[mode] = Front(run, mode)
            run.up(timeout_s=60)
        return started[mode]

    try:
        yield get
    finally:
        for front in started.values():
            try:
                assert front.run.terminate(timeout_s=30) == 0
            finally:
                front.run.kill_everything()
            assert processes_mentioning(str(front.run.state_dir)) == []


@dataclass
class Knock:
    """What one websocket attempt got: the RFB banner (accepted), an HTTP refusal, or a close with a reason."""

    kind: str  # "banner" | "http" | "close"
    status: int = 0
    reason: str = ""
    ws: aiohttp.ClientWebSocketResponse | None = None


async def knock(http: aiohttp.ClientSession, url: str) -> Knock:
    try:
        ws = await http.ws_connect(url, protocols=("binary",))
    except aiohttp.WSServerHandshakeError as exc:
        return Knock("http", status=exc.status)
    msg = await ws.receive(timeout=10)
    if msg.type is aiohttp.WSMsgType.BINARY and msg.data.startswith(b"RFB 003.008\n"):
        return Knock("banner", ws=ws)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    return Knock("close", status=msg.data, reason=msg.extra or "")


def assert_refused(front: Front, result: Knock) -> None:
    if front.mode == "builtin":  # the relay closes at once, with the reason
        assert (result.kind, result.status) == ("close", 1008), result
        assert result.reason == f"too many viewers of this desktop ({MAX_VIEWERS} open); close one"
    else:  # Apache (mod_qos) answers before any websockify process is involved
        assert (result.kind, result.status) == ("http", 429), result


class Viewer:
    """A participant's viewer that completed the VNC handshake and stays connected."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()

    async def still_served(self) -> bool:
        """Ask for a screen update and get it: the tunnel is alive."""
        await self.ws.send_bytes(bytes([3, 0, 0, 0, 0, 0, 0, 16, 0, 16]))  # FramebufferUpdateRequest 16x16
        msg = await self.ws.receive(timeout=10)
        return msg.type is aiohttp.WSMsgType.BINARY


async def open_viewer(url: str, password: str, *, source: str = "127.0.0.1",
                      headers: dict[str, str] | None = None) -> Viewer:
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))
    try:
        async with asyncio.timeout(20):
            ws = await http.ws_connect(url, protocols=("binary",), headers=headers)
            stream = rfb.WebSocketStream(ws)
            await rfb.handshake(stream, stream, password)
    except BaseException:
        await http.close()
        raise
    return Viewer(http, ws)


async def timed_attempt(url: str, password: str, *, source: str = "127.0.0.1",
                        headers: dict[str, str] | None = None) -> tuple[float, bool]:
    """Seconds one VNC authentication took through the gateway, and whether it succeeded."""
    started = time.monotonic()
    try:
        viewer = await open_viewer(url, password, source=source, headers=headers)
    except rfb.RfbAuthFailed:
        return time.monotonic() - started, False
    await viewer.close()
    return time.monotonic() - started, True


def upgrade_headers() -> dict[str, str]:
    return {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}


@pytest.mark.system
@pytest.mark.parametrize("mode", ["per-account", "shared", "builtin"])
async def test_viewers_per_account_are_capped_and_the_next_is_refused_at_once(fronts, mode: str) -> None:
    front: Front = fronts(mode)
    first, second = front.accounts[0], front.accounts[1]
    viewers = [await open_viewer(front.url(first), first.password) for _ in range(MAX_VIEWERS)]
    try:
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            assert_refused(front, await knock(http, front.url(first)))
            assert time.monotonic() - started < 2
            if mode != "builtin":  # what a person sees who opens that URL
                async with http.get(front.url(first).replace("ws://", "http://"), headers=upgrade_headers()) as r:
                    assert r.status == 429 and TOO_MANY in await r.text()
        # Another account is not affected, and the viewers already open keep working.
        await rfb.connect_websocket(front.url(second), second.password, timeout_s=10)
        assert all([await v.still_served() for v in viewers])
        # One viewer closes: the next one is let in (the count follows closed tunnels).
        await viewers.pop().close()
        deadline = time.monotonic() + 10
        while True:
            try:
                viewers.append(await open_viewer(front.url(first), first.password))
                break
            except (aiohttp.WSServerHandshakeError, rfb.RfbError):
                assert time.monotonic() < deadline, "a closed viewer still counts"
                await asyncio.sleep(0.2)
    finally:
        for viewer in viewers:
            await viewer.close()


async def landing_seconds(http: aiohttp.ClientSession, url: str) -> float:
    started = time.monotonic()
    async with http.get(url) as response:
        assert response.status == 200 and "ws02" in await response.text()
    return time.monotonic() - started


@pytest.mark.system
@pytest.mark.parametrize("mode", ["per-account", "shared", "builtin"])
async def test_150_websockets_to_one_account_do_not_slow_the_landing_page_or_other_accounts(fronts,
                                                                                          mode: str) -> None:
    front: Front = fronts(mode)
    target, other = front.accounts[0], front.accounts[1]
    async with aiohttp.ClientSession() as http:
        baseline = max([await landing_seconds(http, front.run.url) for _ in range(5)])
        flood_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            flood = asyncio.gather(*(knock(flood_http, front.url(target)) for _ in range(150)))
            during = [await landing_seconds(http, front.run.url) for _ in range(5)]
            started = time.monotonic()
            await rfb.connect_websocket(front.url(other), other.password, timeout_s=10)
            other_handshake = time.monotonic() - started
            results = await flood
            accepted = [r for r in results if r.kind == "banner"]
            refused = [r for r in results if r.kind != "banner"]
            print(f"\n{mode}: 150 websockets to one account: {len(accepted)} accepted, {len(refused)} refused; "
                  f"landing page {baseline * 1000:.0f} ms before, max {max(during) * 1000:.0f} ms during; "
                  f"another account's handshake {other_handshake * 1000:.0f} ms")
            assert len(accepted) == MAX_VIEWERS
            for result in refused:
                assert_refused(front, result)
            assert max(during) < max(1.0, 5 * baseline), during
            assert other_handshake < 3
            if mode == "per-account":  # the refused ones never reached websockify: listener + 4 children
                pattern = f"127.0.0.1:{target.websocket_port}".encode()
                proxies = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, pattern)]
                assert len(proxies) == 1 + MAX_VIEWERS, proxies
        finally:
            await flood_http.close()  # the flood's connections end here
    if mode == "builtin":
        # The accepted flood connections never authenticated: the relay closes them at the deadline,
        # and the account's participant gets in.
        await asyncio.sleep(AUTH_TIMEOUT_S)
    viewer = await _open_when_free(front, target)
    await viewer.close()


def _cmdline_has(proc: Path, needle: bytes) -> bool:
    try:
        return b"websockify" in (cmd := (proc / "cmdline").read_bytes()) and needle in cmd
    except OSError:
        return False


async def _open_when_free(front: Front, account: Account) -> Viewer:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await open_viewer(front.url(account), account.password)
        except (aiohttp.WSServerHandshakeError, rfb.RfbError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# -- slow or silent clients ------------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.parametrize("mode", ["builtin", "per-account"])
async def test_a_websocket_that_does_not_authenticate_is_closed_at_the_deadline(fronts, mode: str) -> None:
    """The relay reads the handshake itself; a per-account websockify follows it in each connection's process."""
    front: Front = fronts(mode)
    account = front.accounts[2]
    async with aiohttp.ClientSession() as http:
        silent = await knock(http, front.url(account))
        assert silent.kind == "banner" and silent.ws is not None
        started = time.monotonic()
        # One deadline for the whole wait: receive(timeout=) restarts on every heartbeat ping it answers.
        msg = await asyncio.wait_for(silent.ws.receive(), AUTH_TIMEOUT_S + 10)
        elapsed = time.monotonic() - started
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
    assert msg.extra == f"VNC authentication not finished within {AUTH_TIMEOUT_S} s"
    assert AUTH_TIMEOUT_S - 0.5 < elapsed < AUTH_TIMEOUT_S + 3, elapsed
    # A viewer that authenticated is not touched by the deadline.
    viewer = await open_viewer(front.url(account), account.password)
    try:
        await asyncio.sleep(AUTH_TIMEOUT_S + 1)
        assert await viewer.still_served()
    finally:
        await viewer.close()


@pytest.mark.system
async def test_slow_request_headers_are_cut_off_by_apache(fronts) -> None:
    front: Front = fronts("per-account")
    reader, writer = await asyncio.open_connection("127.0.0.1", front.run.listen_port)
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ...and the rest never comes
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=40)
    elapsed = time.monotonic() - started
    writer.close()
    print(f"\nincomplete request headers: connection closed after {elapsed:.1f} s")
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b"", answer[:80]
    assert 9 < elapsed < 15, elapsed  # mod_reqtimeout's own default would be 20 s, Apache's Timeout 60 s
    async with aiohttp.ClientSession() as http:  # and the landing page is served as before
        assert await landing_seconds(http, front.run.url) < 2


# -- VNC password guessing ---------------------------------------------------------------------------


@pytest.mark.system
async def test_wrong_passwords_slow_down_that_account_and_address_but_never_lock_out(fronts) -> None:
    front: Front = fronts("builtin")
    account = front.accounts[2]
    url = front.url(account)
    wrong = "wrong" + account.password[:3]
    seconds = []
    for _ in range(4):
        took, ok = await timed_attempt(url, wrong)
        assert not ok
        seconds.append(took)
    print("\nwrong-password attempts took " + ", ".join(f"{s:.2f}" for s in seconds) + " s")
    # Backoff after 1, 2, 3 failures: 0.5, 1 and 2 s before the next attempt reaches the desktop.
    assert seconds[0] < 0.45 and seconds[1] >= 0.45 and seconds[2] >= 0.95 and seconds[3] >= 1.95, seconds
    # A forged X-Forwarded-For does not make a fresh client of the same laptop (Apache appends the real one).
    took, ok = await timed_attempt(url, wrong, headers={"X-Forwarded-For": "203.0.113.9"})
    assert not ok and took >= 3.9, took
    # Another participant at another address is not slowed; a lockout would punish the whole venue.
    took, ok = await timed_attempt(url, wrong, source="127.0.0.2")
    assert not ok and took < 0.45, took
    # The right password from the guessing address still gets in, after at most the cap.
    took, ok = await timed_attempt(url, account.password)
    assert ok and took < 4 + 2, took
    # ...and that success forgives the address.
    took, ok = await timed_attempt(url, wrong)
    assert not ok and took < 0.45, took


# -- X-Forwarded-For only from the gateway's own Apache --------------------------------------------------


def admin_auth(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}


@pytest.mark.system
async def test_admin_rate_limit_believes_x_forwarded_for_only_from_its_apache(fronts) -> None:
    front: Front = fronts("builtin")
    through_apache = f"{front.run.url}admin/"
    direct = f"http://127.0.0.1:{front.web_port()}/admin/"
    async with aiohttp.ClientSession() as http:
        statuses = []
        for i in range(12):  # a new forged address each time, through Apache
            async with http.get(through_apache, headers={**admin_auth("nope"),
                                                         "X-Forwarded-For": f"198.51.100.{i}"}) as r:
                statuses.append(r.status)
        assert statuses == [401] * 10 + [429] * 2, statuses
        # Straight to the gateway's port, bypassing Apache: a forged address does not count either.
        async with http.get(direct, headers={**admin_auth("nope"), "X-Forwarded-For": "198.51.100.77"}) as r:
            assert r.status == 429
        # The organiser shares the venue's address with whoever typed those: the right password still works.
        right = (front.run.state_dir / "secrets" / "admin.password").read_text().strip()
        async with http.get(through_apache, headers=admin_auth(right)) as r:
            assert r.status == 200
    # Through Apache, another client address is its own (Apache's X-Forwarded-For is believed).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        async with other.get(through_apache, headers=admin_auth("nope")) as r:
            assert r.status == 401
