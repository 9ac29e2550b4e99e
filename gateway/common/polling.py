"""Waiting for something to become true: one loop with a deadline and a growing delay.

Used wherever the gateway waits on the outside world (a port to listen, a process to exit, a job to
run, a file to appear), so that every wait has the same shape: ask, sleep a little longer each
time up to a ceiling, give up at the deadline with a message that says what was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "PollTimeout", "poll_until", "wait_for_port", "PortNotReady"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between attempts: ``first_s``, then times ``factor`` each time, never above ``max_s``."""

    first_s: float = 0.02
    factor: float = 2.0
    max_s: float = 0.25

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield delay
            delay = min(delay * self.factor, self.max_s)


class PollTimeout(TimeoutError):
    def __init__(self, what: str, timeout_s: float) -> None:
        self.what = what
        self.timeout_s = timeout_s
        super().__init__(f"{what} not within {timeout_s:g} s")


async def poll_until(
    check: Callable[[], T | None | Awaitable[T | None]],
    *,
    timeout_s: float,
    what: str,
    backoff: Backoff = Backoff(),
) -> T:
    """Call ``check`` (plain or async) until it returns something other than None or False.

    Returns that value. Raises :class:`PollTimeout` (``what`` says what was awaited) at the
    deadline; an exception raised by ``check`` ends the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    for delay in backoff.delays():
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result is not None and result is not False:
            return result  # type: ignore[return-value]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PollTimeout(what, timeout_s)
        await asyncio.sleep(min(delay, remaining))
    raise AssertionError("unreachable")  # pragma: no cover - delays() never ends


class PortNotReady(Exception):
    """A program did not start listening: it exited first, or the deadline passed."""


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def wait_for_port(
    host: str, port: int, *, timeout_s: float, exit_status: Callable[[], int | None] | None = None
) -> None:
    """Return once a TCP connection to host:port succeeds.

    ``exit_status`` (e.g. ``lambda: proc.returncode``) ends the wait early when the program that
    should listen has exited. Raises :class:`PortNotReady` with a one-line reason.
    """

    async def listening() -> bool:
        if exit_status is not None and (status := exit_status()) is not None:
            raise PortNotReady(f"exited with status {status} before listening on {port}")
        return await _accepts(host, port)

    try:
        await poll_until(listening, timeout_s=timeout_s, what=f"{host}:{port} listening")
    except PollTimeout:
        raise PortNotReady(f"nothing listened on {host}:{port} within {timeout_s:g} s") from None
