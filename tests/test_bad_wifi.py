"""A session that survives bad Wi-Fi (issue 17): a 30 s network cut, and a storm of reconnects.

Chromium runs in a network namespace of its own (tests/netem.py) and reaches a real `gateway up`
through a veth pair and a plain TCP relay on the host (the relay's socket to the browser plays the
gateway's). The cut drops every packet in the kernel, both ways, with the links up: no "offline"
event, no reset, as when Wi-Fi stops passing packets. Timings here are requirements of the issue
(resume within 5 s of the network returning; no lockout), not measurements: those are in bench/wifi.py.

The storm test's last part fails with ``proxy.heartbeat_s: 30`` (the default before
/tmp/helpers/wifi-product.patch, which makes it 5): see its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.common import rfb
from tests.gateway_run import GatewayRun, display_env, running_gateway
from tests.netem import ImpairedRelay, Link, namespace_link, run_in_namespace
from tests.system import chromium_browser, require_program, skip_or_fail

pytestmark = pytest.mark.system

CUT_S = 30
RESUME_WITHIN_S = 5
#: The issue's storm: this many reconnects of one participant within a minute.
STORM_RECONNECTS = 50
#: A viewer retries a refused connection by itself within a few seconds; longer than this is a lockout.
LOCKOUT_S = 5
#: The tunnels of viewers that vanished in a cut are found by the next heartbeat ping (proxy.heartbeat_s,
#: 5 s) and closed; until then they count against the cap. Longer than this is a lockout.
VANISHED_FOUND_S = 8
#: proxy.max_viewers_per_account of these tests' gateway (the default).
VIEWER_CAP = 4

SIZES = {"laptop": {"width": 1366, "height": 768}, "phone": {"width": 390, "height": 844}}
CANVAS_JS = "() => { const c = document.querySelector('#screen canvas'); return c ? c.toDataURL() : ''; }"
#: Every state the viewer passes through, recorded in the page (a poll could miss a short one).
RECORD_STATES_JS = """() => {
  window.seenStates = [document.getElementById('status').dataset.state];
  new MutationObserver(() => window.seenStates.push(document.getElementById('status').dataset.state))
    .observe(document.getElementById('status'), {attributes: true, attributeFilter: ['data-state']});
}"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayRun]:
    with running_gateway(tmp_path_factory.mktemp("wifi"), 2) as run:
        yield run


@pytest.fixture
def link() -> Iterator[Link]:
    for program in ("ip", "tc", "nsenter"):
        require_program(program)
    if os.geteuid() != 0:
        skip_or_fail("network namespaces and tc need root")
    with namespace_link() as made:
        yield made


@pytest.fixture
def relay(link: Link, gateway: GatewayRun) -> Iterator[ImpairedRelay]:
    """The namespace's way to the gateway: host_address:relay.port is the gateway's listen address."""
    with ImpairedRelay(link.host_address, ("127.0.0.1", gateway.listen_port)) as made:
        yield made


def wait_for_state(page, state: str, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    """Until the viewer's #status says ``state``; else fail with what it says instead."""
    try:
        page.wait_for_selector(f"#status[data-state={state}]", state="attached", timeout=max(1, timeout_s * 1000))
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError: say what the page shows instead
        shown = page.evaluate("[document.getElementById('status').dataset.state, "
                              "document.getElementById('status-text').textContent]")
        raise AssertionError(f"viewer not {state} within {timeout_s:.1f} s: {shown}") from None


def open_viewer(browser, base: str, account, size: str):  # type: ignore[no-untyped-def]
    phone = size == "phone"
    context = browser.new_context(viewport=SIZES[size], is_mobile=phone, has_touch=phone)
    page = context.new_page()
    page.goto(f"{base}view/{account.id}")
    page.fill("#password", account.password)
    page.press("#password", "Enter")
    wait_for_state(page, "connected", 20)
    page.evaluate(RECORD_STATES_JS)
    return page


@contextlib.contextmanager
def clocks(gateway: GatewayRun) -> Iterator[None]:
    """A clock ticking every 0.2 s on each desktop: its screen keeps changing (bytes in flight during a
    cut, as on a real desktop), and a viewer that shows it ticking is live."""
    require_program("xterm")
    argv = ["xterm", "-geometry", "20x2+0+0", "-e", "sh", "-c", "while :; do date +%T.%N; sleep 0.2; done"]
    procs = [subprocess.Popen(argv, env=display_env(gateway.state_dir, a.id), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True) for a in gateway.accounts]
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def screen_is_live(page, within_s: float) -> bool:  # type: ignore[no-untyped-def]
    """The canvas changes (the clock ticks) within ``within_s``."""
    first = page.evaluate(CANVAS_JS)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if page.evaluate(CANVAS_JS) != first:
            return True
    return False


def test_viewer_resumes_within_5_s_of_a_30_s_cut_without_the_password(gateway: GatewayRun, link: Link,
                                                                        relay: ImpairedRelay, tmp_path: Path) -> None:
    base = f"http://{link.host_address}:{relay.port}/"
    with clocks(gateway), chromium_browser(lambda chromium: link.chromium_wrapper(tmp_path, chromium)) as browser:
        pages = {size: open_viewer(browser, base, account, size)
                 for size, account in zip(SIZES, gateway.accounts)}
        for size, page in pages.items():
            assert screen_is_live(page, 5), size
        link.cut()
        cut_at = time.monotonic()
        # The viewers notice the silent network by themselves and say so (no countdown to nowhere).
        noticed = {}
        for size, page in pages.items():
            wait_for_state(page, "reconnecting", 12)
            assert page.is_visible("#status"), size
            noticed[size] = round(time.monotonic() - cut_at, 1)
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
        link.mend()
        mended_at = time.monotonic()
        resumed = {}
        for size, page in pages.items():  # connected again, and showing the desktop as it is now
            wait_for_state(page, "connected", RESUME_WITHIN_S - (time.monotonic() - mended_at))
            assert screen_is_live(page, RESUME_WITHIN_S - (time.monotonic() - mended_at)), size
            resumed[size] = round(time.monotonic() - mended_at, 1)
        for size, page in pages.items():
            seen = page.evaluate("window.seenStates")
            assert not {"idle", "wrong-password", "disconnected"} & set(seen), (size, seen)  # no password asked
            assert page.is_hidden("#login"), size
            assert page.evaluate("gatewayViewer.connects") == 2, size
        print(f"cut noticed after {noticed} s; resumed after the network returned: {resumed} s")


async def _reconnect(http: aiohttp.ClientSession, url: str, password: str,
                     within_s: float = LOCKOUT_S) -> tuple[aiohttp.ClientWebSocketResponse, float, int]:
    """Get in as the viewer does (a refusal is retried every 0.5 s); returns the websocket, authenticated,
    how long it took and how often it was refused. Refused for longer than ``within_s`` is a lockout."""
    started = time.monotonic()
    refusals = 0
    while True:
        try:
            ws = await http.ws_connect(url, protocols=("binary",), timeout=aiohttp.ClientWSTimeout(ws_close=1))
            stream = rfb.WebSocketStream(ws)
            async with asyncio.timeout(within_s):
                await rfb.handshake(stream, stream, password)
            return ws, time.monotonic() - started, refusals
        except (aiohttp.ClientError, rfb.RfbError, asyncio.IncompleteReadError, TimeoutError) as exc:
            if isinstance(exc, rfb.RfbAuthFailed) or time.monotonic() - started > within_s:
                raise AssertionError(f"locked out for {time.monotonic() - started:.1f} s: {exc!r}") from exc
            refusals += 1
            await asyncio.sleep(0.5)


async def _vanish(link: Link, ws: aiohttp.ClientWebSocketResponse) -> None:
    """The connection is lost without a trace, as in a cut: its reset never reaches the gateway."""
    await asyncio.sleep(0.3)  # an idle screen: everything sent has been acknowledged, nothing is in flight
    sock = ws.get_extra_info("socket")
    await asyncio.to_thread(link.cut)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, never a FIN
        ws._response.connection.transport.abort()  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(link.mend)


def test_a_storm_of_reconnects_locks_nobody_out(gateway: GatewayRun, link: Link, relay: ImpairedRelay) -> None:
    """50 reconnects of one participant (each closing the one before, as a reload does), with another
    participant getting in in the middle; then as many connections lost in cuts as the per-account cap
    allows (tunnels the gateway cannot know are dead): the participant still gets in within VANISHED_FOUND_S.

    That last part needs dead tunnels to be found within a few seconds: the gateway's heartbeat (a ping
    written to each tunnel; a vanished client's computer answers it with a reset) must be that short
    (/tmp/helpers/wifi-product.patch: proxy.heartbeat_s 30 -> 5)."""
    first, other = gateway.accounts
    base = f"ws://{link.host_address}:{relay.port}"

    async def other_gets_in() -> None:
        session = await rfb.connect_websocket(base + other.websocket_path, other.password, timeout_s=LOCKOUT_S)
        assert session.width > 0

    async def storm() -> dict[str, float]:
        refused = 0
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            for n in range(STORM_RECONNECTS):
                ws, _, refusals = await _reconnect(http, base + first.websocket_path, first.password)
                refused += refusals
                if n == STORM_RECONNECTS // 2:
                    await other_gets_in()
                await ws.close()
            took = time.monotonic() - started
            for _ in range(VIEWER_CAP):
                ws, _, _ = await _reconnect(http, base + first.websocket_path, first.password)
                await _vanish(link, ws)
            await other_gets_in()  # while this account's cap is full of dead tunnels
            ws, after_vanished, _ = await _reconnect(http, base + first.websocket_path, first.password,
                                                     within_s=VANISHED_FOUND_S)
            await ws.close()
        return {"took": took, "refused": refused, "after_vanished": after_vanished}

    result = run_in_namespace(link, storm)
    print(f"{STORM_RECONNECTS} reconnects in {result['took']:.1f} s, {result['refused']} refused; "
          f"in again {result['after_vanished']:.1f} s after {VIEWER_CAP} connections vanished")
    assert result["took"] < 60  # the "in a minute"
    assert result["refused"] == 0
