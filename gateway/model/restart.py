"""When to try again: jittered exponential backoff, and a limit of attempts within a window.

Kept apart from the code that starts processes, so every watched thing (desktop, proxy, Apache)
follows the same rules and the rules can be tested without processes.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

from gateway.model.config import RestartConfig

__all__ = ["RestartPolicy"]


class RestartPolicy:
    """Decides the delay before the next restart, or that it is time to give up.

    ``next_delay()`` is called once per failure. After ``max_attempts`` failures within
    ``window_s`` it returns None: the thing is failing for a reason a restart won't fix. A thing
    that then runs well for a whole window is forgiven (``record_healthy``).
    """

    def __init__(self, config: RestartConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._failures: deque[float] = deque()
        self._consecutive = 0

    @property
    def restarts(self) -> int:
        """Failures inside the current window."""
        self._expire()
        return len(self._failures)

    def next_delay(self) -> float | None:
        self._expire()
        if len(self._failures) >= self.config.max_attempts:
            return None
        self._failures.append(self._clock())
        exponent = self._consecutive
        self._consecutive += 1
        ceiling = min(self.config.backoff_max_s, self.config.backoff_initial_s * (2 ** exponent))
        # "Equal jitter": at least half the ceiling, so retries are spread but never immediate.
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def record_healthy(self) -> None:
        """The thing has come up and passed its check: the next failure starts the backoff anew."""
        self._consecutive = 0

    def _expire(self) -> None:
        horizon = self._clock() - self.config.window_s
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()
