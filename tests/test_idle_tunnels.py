"""Idle viewers stay connected: heartbeats keep a silent desktop tunnel open through Apache.

A participant reading the slides leaves the viewer open with nothing drawn and nothing typed. Apache
closes a tunnel after ``apache.tunnel_timeout_s`` without traffic; websockify's ``--heartbeat`` (the
websockify modes) and the relay's pings (builtin mode) are what keep it open. With a short timeout,
one idle viewer per proxy mode is held open across several timeouts, and must still draw afterwards.
A control viewer whose proxy falls silent (stopped with SIGSTOP) shows that the timeout is real.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.common import rfb
from gateway.proxies.apache import ApacheLayout, render_apache_config
from gateway.model.config import parse_config
from gateway.model.errors import InputError
from gateway.model.state import StateStore
from tests.gateway_run import GatewayRun, make_accounts, processes_mentioning
from tests.os_check import processes

TUNNEL_TIMEOUT_S = 2
HEARTBEAT_S = 1
#: Several tunnel timeouts of silence.
IDLE_S = 3 * TUNNEL_TIMEOUT_S + 0.5

MODES = ("per-account", "shared", "builtin")


def config(mode: str) -> str:
    return (f"apache:\n  tunnel_timeout_s: {TUNNEL_TIMEOUT_S}\n"
            f"proxy:\n  mode: {mode}\n  heartbeat_s: {HEARTBEAT_S}\n")


class IdleViewer:
    """A viewer that authenticates, then neither asks for pictures nor types; it keeps reading (as a
    browser does, which answers pings) and notes when the tunnel ends."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed_at: float | None = None
        self.reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, password: str) -> "IdleViewer":
        http = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(http.ws_connect(url, protocols=("binary",)), 10)  # no pings of its own
            stream = rfb.WebSocketStream(ws)
            await asyncio.wait_for(rfb.handshake(stream, stream, password), 10)
        except BaseException:
            await http.close()
            raise
        viewer = cls(http, ws)
        viewer.reader = asyncio.create_task(viewer._read())
        return viewer

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()  # answers the proxy's pings while it waits
            if message.type == aiohttp.WSMsgType.BINARY:
                self.messages.put_nowait(message.data)
            elif message.type != aiohttp.WSMsgType.TEXT:
                self.closed_at = time.monotonic()
                return

    async def draws(self) -> bool:
        """Whether the desktop still answers a screen update request through the tunnel."""
        if self.closed_at is not None:
            return False
        await self.ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1))  # FramebufferUpdateRequest, 1x1
        try:
            answer = await asyncio.wait_for(self.messages.get(), 5)
        except TimeoutError:
            return False
        return answer[0] == 0  # FramebufferUpdate

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.ws.close()
        await self.http.close()


def children(pid: int) -> set[int]:
    return {p.pid for p in processes() if p.ppid == pid}


def proxy_pid(run: GatewayRun) -> int:
    store = StateStore(run.state_dir / "gateway.db")
    try:
        return store.services()[f"proxy:{run.accounts[0].id}"].pid
    finally:
        store.close()


def test_pings_must_come_more_often_than_apache_cuts_silent_tunnels() -> None:
    with pytest.raises(InputError, match="proxy.heartbeat_s: must be shorter than apache.tunnel_timeout_s"):
        parse_config("apache:\n  tunnel_timeout_s: 60\nproxy:\n  heartbeat_s: 60\n", "g.yaml")
    with pytest.raises(InputError, match="apache.tunnel_timeout_s: must be at least 2"):
        parse_config("apache:\n  tunnel_timeout_s: 1\n", "g.yaml")
    parse_config("apache:\n  mode: none\n  tunnel_timeout_s: 2\nproxy:\n  mode: builtin\n  heartbeat_s: 30\n")
    # The private Apache's Timeout (the client side of every tunnel) never outlasts the tunnel timeout.
    for timeout, expected in ((TUNNEL_TIMEOUT_S, TUNNEL_TIMEOUT_S), (86400, 60)):
        config = parse_config(f"apache:\n  tunnel_timeout_s: {timeout}\nproxy:\n  heartbeat_s: {HEARTBEAT_S}\n")
        text = render_apache_config(config, [], web_port=9999,
                                    layout=ApacheLayout(Path("/srv/gw/apache")), listen="127.0.0.1:8080")
        assert f"\nTimeout {expected}\n" in text and "\nTimeout " not in text.replace(f"\nTimeout {expected}\n", "")


@pytest.mark.system
async def test_idle_viewers_outlive_several_tunnel_timeouts_in_every_proxy_mode(runs, tmp_path: Path) -> None:
    gateways: dict[str, GatewayRun] = {}
    for mode in MODES:  # started side by side: the three start-ups overlap
        (tmp_path / mode).mkdir()
        run = GatewayRun(tmp_path / mode, make_accounts(1), config(mode))
        runs.append(run)
        run.start()
        gateways[mode] = run
    for run in gateways.values():
        await asyncio.to_thread(run.wait_ready, 40)
    httpd = (gateways["per-account"].state_dir / "apache" / "httpd.conf").read_text()
    assert f"Timeout {TUNNEL_TIMEOUT_S}\n" in httpd and f"timeout={TUNNEL_TIMEOUT_S}" in httpd

    viewers: dict[str, IdleViewer] = {}
    stopped: int | None = None
    try:
        for mode, run in gateways.items():
            account = run.accounts[0]
            viewers[mode] = await IdleViewer.open(run.ws_url(account), account.password)
        # The control: a viewer whose websockify (its own forked child) is stopped sends no pings.
        control_run = gateways["per-account"]
        listener = proxy_pid(control_run)
        before = children(listener)
        account = control_run.accounts[0]
        viewers["control"] = await IdleViewer.open(control_run.ws_url(account), account.password)
        (stopped,) = children(listener) - before
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()

        await asyncio.sleep(IDLE_S)

        control = viewers.pop("control")
        viewers["control (closed)"] = control  # closed in the end like the others
        assert control.closed_at is not None, "a silent tunnel was not closed: the tunnel timeout is not in force"
        assert control.closed_at - started < TUNNEL_TIMEOUT_S + 3
        for mode in MODES:
            viewer = viewers[mode]
            assert viewer.closed_at is None, (
                f"{mode}: the idle viewer was disconnected after {viewer.closed_at - started:.1f} s "
                f"(tunnel timeout {TUNNEL_TIMEOUT_S} s, heartbeat {HEARTBEAT_S} s)")
            assert await viewer.draws(), f"{mode}: the idle tunnel no longer reaches the desktop"
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        for viewer in viewers.values():
            await viewer.close()
    for run in gateways.values():
        assert await asyncio.to_thread(run.terminate) == 0
        assert processes_mentioning(str(run.state_dir)) == []
