"""The front door against one hostile client: what the gateway trusts, caps and slows down.

* :data:`FRONT_TOKEN`: a secret the private Apache adds to every request it forwards (header
  :data:`FRONT_HEADER`), so that the gateway trusts ``X-Forwarded-For`` only from that Apache, never
  from a client that reaches the gateway's loopback port directly.
* :class:`GuessBackoff`: failed VNC authentications per (account, client address) delay that key's
  next attempt exponentially, capped at a few seconds; a success clears the key. It slows guessing
  and never locks anyone out (one attacker behind a venue's NAT must not shut out the room).
* :class:`ServerHandshake`: follows the server's half of an RFB handshake far enough to read the
  SecurityResult, so the builtin relay knows whether (and when) a viewer authenticated.

:class:`GuessBackoff` keeps its keys in a :class:`gateway.common.ratelimit.BoundedTable`, like the
sign-in rate limits (:class:`gateway.common.ratelimit.RateLimit`, which refuse where it only delays),
so a flood of addresses cannot grow memory.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.common.ratelimit import BoundedTable

__all__ = ["FRONT_HEADER", "FRONT_TOKEN", "ReadTimeouts", "GuessBackoff", "ServerHandshake",
           "take_bytes", "FOLLOWED_BANNERS"]

FRONT_HEADER = "X-Gateway-Front"
#: RFB server banners whose handshake the gateway follows (TigerVNC's 3.8; 3.7 has the same steps
#: up to the SecurityResult). Any other: the relay stops reading the handshake and just forwards.
FOLLOWED_BANNERS = (b"RFB 003.008\n", b"RFB 003.007\n")
#: Made fresh by each gateway process; written only into the private Apache's config (state dir, 0700).
FRONT_TOKEN = secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ReadTimeouts:
    """mod_reqtimeout's limits in the private Apache: seconds for request headers and bodies."""

    header: int = 10
    header_max: int = 20
    body: int = 20


def take_bytes(buffer: bytearray, n: int) -> bytes | None:
    """The first ``n`` bytes of ``buffer``, removed from it; None (and nothing removed) while fewer arrived.

    The RFB readers here and in the relay consume a stream that arrives in arbitrary pieces.
    """
    if len(buffer) < n:
        return None
    chunk = bytes(buffer[:n])
    del buffer[:n]
    return chunk


@dataclass(slots=True)
class _Failures:
    count: int = 0
    not_before: float = 0.0  # monotonic time of the next attempt this key may make
    last: float = 0.0


class GuessBackoff:
    """Exponential delay of VNC authentication attempts after failures, per (account, address).

    The first failure costs ``first_s`` before the key's next attempt, each further one doubles it,
    up to ``max_s``. Attempts of one key run one after the other at that pace, however many
    websockets it opens. Keys without a failure for ``forget_s`` are forgotten.
    """

    def __init__(self, *, first_s: float = 0.5, max_s: float = 4.0, forget_s: float = 600.0,
                 limit: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.forget_s = forget_s
        self.clock = clock
        self._table: BoundedTable[tuple[str, str], _Failures] = BoundedTable(limit)

    def __len__(self) -> int:
        return len(self._table)

    def delay(self, failures: int) -> float:
        return 0.0 if failures <= 0 else min(self.max_s, self.first_s * 2 ** (failures - 1))

    def reserve(self, key: tuple[str, str]) -> float:
        """Seconds this attempt must wait; it takes the key's next turn."""
        now = self.clock()
        self._table.expire(lambda f: now - f.last < self.forget_s)
        entry = self._table.get(key, _Failures)
        start = max(now, entry.not_before)
        entry.not_before = start + self.delay(entry.count)
        entry.last = now
        return start - now

    def failed(self, key: tuple[str, str]) -> None:
        entry = self._table.get(key, _Failures)
        entry.count += 1
        entry.last = self.clock()
        entry.not_before = max(entry.not_before, entry.last + self.delay(entry.count))

    def succeeded(self, key: tuple[str, str]) -> None:
        self._table.pop(key)


class ServerHandshake:
    """The server's half of an RFB 3.7/3.8 handshake, up to its SecurityResult.

    Feed it what the server sends; :attr:`result` becomes True (authenticated) or False (refused).
    The relay tells it which security type the client chose (:meth:`client_chose`). A handshake it
    cannot follow (another version or security type) leaves ``result`` None for good.
    """

    __slots__ = ("_buffer", "_stage", "_chosen", "result", "lost")

    VNC_AUTH = 2
    NONE = 1

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._stage = "version"
        self._chosen: int | None = None
        self.result: bool | None = None
        self.lost = False

    @property
    def done(self) -> bool:
        return self.result is not None or self.lost

    def client_chose(self, security_type: int) -> None:
        self._chosen = security_type

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buffer += data
        while not self.done and self._step():
            pass

    def _take(self, n: int) -> bytes | None:
        return take_bytes(self._buffer, n)

    def _step(self) -> bool:
        """Consume one part of the handshake; False when more data is needed."""
        if self._stage == "version":
            banner = self._take(12)
            if banner is None:
                return False
            if banner not in FOLLOWED_BANNERS:
                self.lost = True
                return False
            self._stage = "types"
            return True
        if self._stage == "types":
            if len(self._buffer) < 1 or len(self._buffer) < 1 + self._buffer[0]:
                return False
            if self._buffer[0] == 0:  # the server refuses the connection (a reason follows)
                self.result = False
                return False
            self._take(1 + self._buffer[0])
            self._stage = "chosen"
            return True
        if self._stage == "chosen":
            if self._chosen is None:
                return False
            if self._chosen == self.VNC_AUTH:
                self._stage = "challenge"
            elif self._chosen == self.NONE:
                self._stage = "result"
            else:
                self.lost = True
                return False
            return True
        if self._stage == "challenge":
            if self._take(16) is None:
                return False
            self._stage = "result"
            return True
        word = self._take(4)
        if word is None:
            return False
        self.result = word == b"\x00\x00\x00\x00"
        return False
