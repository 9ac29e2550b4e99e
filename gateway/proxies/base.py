"""What every proxy mode is to the supervisor: :class:`ProxyMode`, its :class:`Route` and :class:`RunningProxy`.

The supervisor only uses :meth:`ProxyMode.start`, :meth:`ProxyMode.stop` and
:meth:`RunningProxy.wait`, so it does not know which mode runs (the modes are
:mod:`gateway.proxies.websockify` and :mod:`gateway.proxies.relay`; :mod:`gateway.proxies.modes`
picks one by name). A proxy process that does not start listening fails with
:class:`ProxyStartError`, whatever started it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from gateway.common.polling import PortNotReady
from gateway.common.proc import ProcessIdentity, terminate_group
from gateway.model.status import Endpoint
from gateway.model.tokens import Account

__all__ = ["Route", "ProxyProcess", "RunningProxy", "ProxyMode", "ProxyStartError", "reported_as_start_error"]


@dataclass(frozen=True, slots=True)
class Route:
    """One Apache route: a public websocket path to a listener on 127.0.0.1.

    ``port`` None means the gateway's own web server (its port is known only once it listens).
    ``target`` is the path (and query) asked of that listener; ``nocanon`` passes it to the
    backend as written (needed for a ``?token=`` query, which Apache would otherwise escape).
    """

    account: str
    path: str
    port: int | None
    target: str = "/"
    nocanon: bool = False


class ProxyProcess(Protocol):
    """What the gateway uses of a proxy process: an asyncio subprocess, or a forked websockify."""

    pid: int
    returncode: int | None

    async def wait(self) -> int: ...


@dataclass(slots=True)
class RunningProxy:
    """One account's running proxy, as :meth:`ProxyMode.start` returned it.

    ``process`` and ``identity`` are the websockify serving the account (shared by every account
    in shared mode), or None when the proxy runs inside the gateway (builtin mode).
    """

    account: str
    endpoint: Endpoint
    process: ProxyProcess | None = None
    identity: ProcessIdentity | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        return not self._stopped.is_set()

    async def wait(self) -> int:
        """Return once the proxy has died (or was stopped): its exit status, 0 for builtin."""
        if self.process is not None:
            return await self.process.wait()
        await self._stopped.wait()
        return 0

    def mark_stopped(self) -> None:
        self._stopped.set()


class ProxyMode(abc.ABC):
    """How websockets reach VNC servers. Listeners bind to 127.0.0.1 only."""

    name: str

    @abc.abstractmethod
    def routes(self, accounts: Sequence[Account]) -> list[Route]:
        """The Apache routes for these accounts; fixed for the life of the gateway."""

    @abc.abstractmethod
    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        """Start forwarding ``account``'s websocket to ``endpoint``; return once it listens.

        May be called again for the same account after its proxy died or its endpoint moved.
        """

    def web_routes(self, accounts: Sequence[Account]) -> list[web.RouteDef]:
        """Routes this mode adds to the gateway's own web server (only the builtin relay has any)."""
        return []

    async def stop(self, proxy: RunningProxy) -> None:
        """Stop forwarding for the account ``proxy`` was started for; idempotent."""
        if proxy.identity is not None:
            await terminate_group(proxy.identity, proc=proxy.process, grace_s=3)  # type: ignore[arg-type]
        proxy.mark_stopped()


class ProxyStartError(Exception):
    """A proxy process did not start listening: it exited first, or the deadline passed."""


@contextlib.contextmanager
def reported_as_start_error() -> Iterator[None]:
    """Raise the common helpers' :class:`PortNotReady` (from :func:`gateway.common.proc.spawn_listening`
    and the like) as this layer's :class:`ProxyStartError`, with the same one-line reason."""
    try:
        yield
    except PortNotReady as exc:
        raise ProxyStartError(str(exc)) from None
