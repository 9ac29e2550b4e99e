"""The VNC authentication deadline inside a per-account websockify (``proxy.auth_timeout_s``).

websockify relays bytes without reading them, so on its own it keeps a websocket that never
authenticates until the tunnel timeout. The fork server therefore runs websockify with
:func:`deadline_handler`: websockify's own request handler, whose connection to the desktop is
watched by :class:`HandshakeWatch`, which follows the RFB handshake in both directions
(:class:`gateway.common.frontdoor.ServerHandshake`, the same reader the builtin relay uses). Each
websocket is a process of its own (websockify forks one per connection), so a timer signal is that
connection's alone: it is cancelled when the SecurityResult says "authenticated", and otherwise
closes the websocket with code 1008, as the builtin relay does.
"""

from __future__ import annotations

import signal
import socket
from typing import Any

from gateway.common.frontdoor import ServerHandshake

__all__ = ["HandshakeWatch", "deadline_handler", "CLIENT_CHOICE_OFFSET"]

#: The client's chosen security type follows its 12-byte ProtocolVersion (RFB 3.7 and 3.8).
CLIENT_CHOICE_OFFSET = 12


class _AuthDeadline(Exception):
    """The timer went off before the viewer authenticated."""


class HandshakeWatch:
    """The connection to the desktop, as websockify uses it (fileno, recv, send), following the handshake.

    ``settled()`` is called once: when the server accepted the viewer's authentication, or when the
    handshake is one the watch cannot follow (then no deadline applies: it would cut a working viewer).
    """

    def __init__(self, sock: socket.socket, settled: Any) -> None:
        self._sock = sock
        self._settled = settled
        self._client_bytes = 0
        self.handshake = ServerHandshake()

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, size: int, *flags: int) -> bytes:
        data = self._sock.recv(size, *flags)
        if not self.handshake.done:
            self.handshake.feed(data)
            self._check()
        return data

    def send(self, data: bytes, *flags: int) -> int:
        sent = self._sock.send(data, *flags)
        if not self.handshake.done and self._client_bytes <= CLIENT_CHOICE_OFFSET < self._client_bytes + sent:
            self.handshake.client_chose(data[CLIENT_CHOICE_OFFSET - self._client_bytes])
            self.handshake.feed(b"")  # what the server sent may now be readable
            self._check()
        self._client_bytes += sent
        return sent

    def _check(self) -> None:
        if self.handshake.result is True or self.handshake.lost:
            self._settled()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def deadline_handler(auth_timeout_s: float) -> type:
    """websockify's ProxyRequestHandler, closing a websocket not authenticated within ``auth_timeout_s``."""
    from websockify import websocketproxy

    class AuthDeadlineHandler(websocketproxy.ProxyRequestHandler):  # type: ignore[misc]
        def do_proxy(self, target: socket.socket) -> None:
            def expire(signum: int, frame: object) -> None:
                raise _AuthDeadline

            def settled() -> None:
                signal.setitimer(signal.ITIMER_REAL, 0)

            signal.signal(signal.SIGALRM, expire)
            signal.setitimer(signal.ITIMER_REAL, auth_timeout_s)
            try:
                super().do_proxy(HandshakeWatch(target, settled))
            except _AuthDeadline:
                self.log_message("VNC authentication not finished within %g s: closed", auth_timeout_s)
                raise self.CClose(1008, f"VNC authentication not finished within {auth_timeout_s:g} s") from None
            finally:
                settled()

    return AuthDeadlineHandler
