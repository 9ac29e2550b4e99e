"""Rate limits kept in memory, in tables whose size is bounded.

* :class:`RateLimit`: at most ``limit`` events per key within a sliding window of ``window_s``
  seconds (sign-ups, failed sign-ins of participants and admins, wrong keyboard-layout passwords).
  It refuses; the caller answers 429 with the seconds :meth:`RateLimit.blocked` returns.
* :class:`BoundedTable`: a dict that keeps at most a fixed number of keys, dropping the least
  recently used, so that a flood of client addresses cannot grow memory. The rate limits here and
  the VNC guessing backoff (:class:`gateway.common.frontdoor.GuessBackoff`, which delays rather than
  refuses) keep their keys in one.
"""

from __future__ import annotations

import collections
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BoundedTable", "RateLimit", "MAX_KEYS"]

#: Keys a table keeps at most (client addresses, accounts).
MAX_KEYS = 10_000

K = TypeVar("K")
V = TypeVar("V")


class BoundedTable(Generic[K, V]):
    """A dict that keeps at most ``limit`` keys: the least recently used one is dropped first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value of ``key`` (made if missing), marked as used now."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return value

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def expire(self, keep: Callable[[V], bool]) -> None:
        """Drop every entry for which ``keep`` is false."""
        for key in [k for k, v in self._items.items() if not keep(v)]:
            del self._items[key]


class RateLimit:
    """At most ``limit`` events per key within ``window_s`` (a sliding window, in memory).

    Past ``max_keys`` keys, the keys without an event in the window are forgotten first, then the
    least recently used ones.
    """

    def __init__(self, limit: int, window_s: float, *, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._events: BoundedTable[str, collections.deque[float]] = BoundedTable(max_keys)

    def __len__(self) -> int:
        """How many keys are remembered."""
        return len(self._events)

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        if len(self._events) >= self._events.limit:  # forget idle keys so the table stays small
            self._events.expire(lambda events: bool(events) and events[-1] > now - self.window_s)
        events = self._events.get(key, collections.deque)
        while events and events[0] <= now - self.window_s:
            events.popleft()
        return events

    def blocked(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        now = self.clock()
        events = self._recent(key, now)
        return events[0] + self.window_s - now if len(events) >= self.limit else 0.0

    def add(self, key: str) -> None:
        """Count one event of ``key`` now."""
        now = self.clock()
        self._recent(key, now).append(now)
