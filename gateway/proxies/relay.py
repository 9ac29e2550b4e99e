"""``proxy.mode: builtin``: the gateway's own web server relays each account's websocket to its desktop.

Each account's websocket path is a route of the gateway's aiohttp application. A request there is
upgraded, a TCP connection is opened to that account's VNC endpoint (as the supervisor reported
it; never a host or port from the request), and bytes are piped both ways as binary websocket
messages until either side closes. No process is started per account or per connection.

Because the relay sees every viewer, it records in the account's :class:`DesktopSlot` how many
viewers are connected and when one last sent keyboard or mouse input. It is also the front door of
this mode: at most ``proxy.max_viewers_per_account`` websockets per account (the next one is closed
at once with the reason), a viewer that has not finished VNC authentication within
``proxy.auth_timeout_s`` is closed, and failed authentications slow down that account's next
attempt from the same client address (see :mod:`gateway.common.frontdoor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.common.frontdoor import FOLLOWED_BANNERS, GuessBackoff, ServerHandshake, take_bytes
from gateway.common.httpauth import client_address
from gateway.model.config import Config
from gateway.model.status import DesktopSlot, Endpoint
from gateway.model.tokens import Account
from gateway.proxies.base import ProxyMode, Route, RunningProxy

__all__ = ["BuiltinRelay", "InputScanner"]

log = logging.getLogger("gateway.relay")

CONNECT_TIMEOUT_S = 10.0
READ_CHUNK = 256 * 1024
MAX_CLIENT_MESSAGE = 4 * 1024 * 1024


class BuiltinRelay(ProxyMode):
    """Websocket-to-TCP relay inside the gateway's aiohttp server."""

    name = "builtin"

    def __init__(self, config: Config, slots: Mapping[str, DesktopSlot]) -> None:
        self.heartbeat_s = config.proxy.heartbeat_s
        self.slots = slots
        self.max_viewers = config.proxy.max_viewers_per_account
        self.auth_timeout_s = config.proxy.auth_timeout_s
        self.behind_apache = config.apache.mode != "none"
        #: Browsers offer permessage-deflate on every websocket; aiohttp accepts it unless told not to.
        self.compression = config.proxy.compression
        #: Failed VNC authentications slow down the next attempt of that account and client address.
        self.backoff = GuessBackoff()
        self._targets: dict[str, Endpoint] = {}
        self._connections: dict[str, set[asyncio.StreamWriter]] = {}
        self._tunnels: dict[str, int] = {}  # open websockets per account, authenticated or not

    def routes(self, accounts: Sequence[Account]) -> list[Route]:
        # Apache forwards the path unchanged to the gateway's web server.
        return [Route(a.id, a.websocket_path, None, a.websocket_path) for a in accounts]

    def web_routes(self, accounts: Sequence[Account]) -> list[web.RouteDef]:
        """One GET route per account path, each bound to that account only."""
        return [web.get(a.websocket_path, self._handler_for(a.id)) for a in accounts]

    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        self._targets[account.id] = endpoint
        log.info("relay ready account=%s target=%s", account.id, endpoint)
        return RunningProxy(account.id, endpoint)

    async def stop(self, proxy: RunningProxy) -> None:
        if self._targets.get(proxy.account) == proxy.endpoint:
            del self._targets[proxy.account]
            # Viewers of a desktop that is stopped or moved are disconnected; noVNC reconnects.
            for writer in list(self._connections.get(proxy.account, ())):
                writer.close()
        proxy.mark_stopped()

    def _handler_for(self, account_id: str):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._relay(request, account_id)

        return handler

    async def _relay(self, request: web.Request, account_id: str) -> web.StreamResponse:
        target = self._targets.get(account_id)
        if target is None:
            raise web.HTTPServiceUnavailable(text="This desktop is not ready yet.")
        ws = web.WebSocketResponse(protocols=("binary",), heartbeat=self.heartbeat_s,
                                   max_msg_size=MAX_CLIENT_MESSAGE, compress=self.compression)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="Expected a websocket upgrade.")
        viewer = _Viewer(account_id, client_address(request, behind_apache=self.behind_apache))
        if self._tunnels.get(account_id, 0) >= self.max_viewers:
            return await self._refuse(request, ws, viewer)
        self._tunnels[account_id] = self._tunnels.get(account_id, 0) + 1
        try:
            return await self._open_tunnel(request, ws, viewer, target)
        finally:
            self._tunnels[account_id] -= 1

    async def _refuse(self, request: web.Request, ws: web.WebSocketResponse, viewer: _Viewer) -> web.WebSocketResponse:
        """Too many tunnels to this account: accept the upgrade only to say why, and close."""
        log.warning("relay refused a viewer: %d open already account=%s address=%s",
                    self.max_viewers, viewer.account, viewer.address)
        await ws.prepare(request)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION,
                       message=f"too many viewers of this desktop ({self.max_viewers} open); close one".encode())
        return ws

    async def _open_tunnel(self, request: web.Request, ws: web.WebSocketResponse, viewer: _Viewer,
                           target: Endpoint) -> web.WebSocketResponse:
        account_id = viewer.account
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(target.host, target.port)
        except (OSError, TimeoutError) as exc:
            log.warning("relay cannot reach desktop account=%s error=%s", account_id, exc)
            raise web.HTTPBadGateway(text="The desktop does not answer.") from None
        slot = self.slots[account_id]
        connections = self._connections.setdefault(account_id, set())
        connections.add(writer)
        slot.viewers += 1
        try:
            await ws.prepare(request)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._to_desktop(ws, writer, slot, viewer))
                    group.create_task(self._to_viewer(reader, ws, viewer))
                    group.create_task(self._auth_deadline(ws, viewer))
            except* _Closed:
                pass
        finally:
            slot.viewers -= 1
            connections.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await writer.wait_closed()
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                async with asyncio.timeout(2):
                    await ws.close()
        return ws

    async def _to_desktop(self, ws: web.WebSocketResponse, writer: asyncio.StreamWriter, slot: DesktopSlot,
                          viewer: _Viewer) -> None:
        scanner = InputScanner()
        try:
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    if scanner.awaiting_auth:  # the VncAuth answer: after this key's failures, it waits
                        viewer.held_s = self.backoff.reserve(viewer.key)  # (not counted against the deadline)
                        await asyncio.sleep(viewer.held_s)
                    if scanner.feed(msg.data):
                        slot.last_input_at = time.time()
                    if scanner.security_type is not None:
                        viewer.handshake.client_chose(scanner.security_type)
                    writer.write(msg.data)
                    await writer.drain()
                elif msg.type is WSMsgType.TEXT:
                    await ws.close(code=1003, message=b"binary frames only")
                    break
                # CLOSE/ERROR end the iteration; PING/PONG are handled by aiohttp.
        except (ConnectionError, OSError):
            pass
        raise _Closed

    async def _to_viewer(self, reader: asyncio.StreamReader, ws: web.WebSocketResponse, viewer: _Viewer) -> None:
        try:
            while data := await reader.read(READ_CHUNK):
                if not viewer.handshake.done:
                    viewer.handshake.feed(data)
                    self._judge(viewer)
                await ws.send_bytes(data)
        except (ConnectionError, OSError):
            pass
        raise _Closed

    def _judge(self, viewer: _Viewer) -> None:
        """Once the server has said whether the password was right: clear or grow the key's backoff."""
        if viewer.handshake.result is None or viewer.decided.is_set():
            return
        if viewer.handshake.result:
            self.backoff.succeeded(viewer.key)
        else:
            self.backoff.failed(viewer.key)
            log.warning("VNC authentication failed account=%s address=%s", viewer.account, viewer.address)
        viewer.decided.set()  # decided either way: the deadline no longer applies

    async def _auth_deadline(self, ws: web.WebSocketResponse, viewer: _Viewer) -> None:
        """A viewer that has not finished VNC authentication in time is closed, with the reason."""
        started = asyncio.get_running_loop().time()
        while not viewer.decided.is_set():
            remaining = started + self.auth_timeout_s + viewer.held_s - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await viewer.decided.wait()
        if viewer.decided.is_set():
            return
        log.warning("relay closed a viewer that did not authenticate within %g s account=%s address=%s",
                    self.auth_timeout_s, viewer.account, viewer.address)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION,
                       message=f"VNC authentication not finished within {self.auth_timeout_s:g} s".encode())
        raise _Closed


@dataclass(slots=True)
class _Viewer:
    """One websocket to an account: who it comes from and how far its VNC handshake got."""

    account: str
    address: str
    handshake: ServerHandshake = field(default_factory=ServerHandshake)
    decided: asyncio.Event = field(default_factory=asyncio.Event)  # the server's SecurityResult came
    held_s: float = 0.0  # how long the relay held back its VncAuth answer (guessing backoff)

    @property
    def key(self) -> tuple[str, str]:
        return (self.account, self.address)


class _Closed(Exception):
    """One direction of a relayed connection ended; the other is cancelled."""


class InputScanner:
    """Follows the client-to-server half of an RFB stream and spots keyboard and mouse events.

    It steps over the client's part of the handshake (version, security type, a VncAuth answer,
    ClientInit) and then over whole client messages. On anything it does not know (another
    security type, an unknown message) it gives up and reports all further data as input, which
    errs towards "the participant is active".
    """

    __slots__ = ("_buffer", "_stage", "_lost", "security_type")

    _FIXED = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}
    _INPUT = frozenset({4, 5, 6})

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._stage = "version"
        self._lost = False
        #: The security type the client chose (None until it has).
        self.security_type: int | None = None

    @property
    def awaiting_auth(self) -> bool:
        """True while the client's next bytes are its VncAuth answer."""
        return self._stage == "auth" and not self._lost

    def feed(self, data: bytes) -> bool:
        """Take the next client bytes; True if they complete at least one input event."""
        if self._lost:
            return True
        self._buffer += data
        found = False
        while True:
            step = self._step()
            if step is None:
                return found or self._lost
            found = found or step

    def _take(self, n: int) -> bytes | None:
        return take_bytes(self._buffer, n)

    def _give_up(self) -> None:
        self._lost = True
        self._buffer.clear()

    def _step(self) -> bool | None:
        """Consume one unit; False/True for a non-input/input unit, None if more data is needed."""
        if self._lost:
            return None
        buf = self._buffer
        if self._stage == "version":
            version = self._take(12)
            if version is None:
                return None
            if version not in FOLLOWED_BANNERS:
                self._give_up()
                return None
            self._stage = "security"
            return False
        if self._stage == "security":
            chosen = self._take(1)
            if chosen is None:
                return None
            self.security_type = chosen[0]
            if chosen == b"\x02":
                self._stage = "auth"
            elif chosen == b"\x01":
                self._stage = "init"
            else:
                self._give_up()
                return None
            return False
        if self._stage == "auth":
            if self._take(16) is None:
                return None
            self._stage = "init"
            return False
        if self._stage == "init":
            if self._take(1) is None:
                return None
            self._stage = "messages"
            return False
        if not buf:
            return None
        kind = buf[0]
        if kind in self._FIXED:
            size = self._FIXED[kind]
        elif kind == 2:  # SetEncodings: 4-byte header, U16 count of 4-byte encodings
            if len(buf) < 4:
                return None
            size = 4 + 4 * int.from_bytes(buf[2:4], "big")
        elif kind == 6:  # ClientCutText: 8-byte header, S32 length (negative: extended format)
            if len(buf) < 8:
                return None
            size = 8 + abs(int.from_bytes(buf[4:8], "big", signed=True))
        elif kind == 248:  # ClientFence: 9-byte header, U8 payload length
            if len(buf) < 9:
                return None
            size = 9 + buf[8]
        elif kind == 251:  # SetDesktopSize: 8-byte header, U8 count of 16-byte screens
            if len(buf) < 8:
                return None
            size = 8 + 16 * buf[6]
        else:
            self._give_up()
            return None
        if size > MAX_CLIENT_MESSAGE:
            self._give_up()
            return None
        if self._take(size) is None:
            return None
        return kind in self._INPUT
