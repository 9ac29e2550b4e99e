"""Websocket-to-VNC proxies: what Apache forwards each account's websocket path to.

The proxy mode is behind :class:`ProxyMode`, so that other modes (one shared websockify with
tokens, or the gateway's own aiohttp relay) can stand beside the per-account websockify.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .backends.base import Endpoint
from .config import Config
from .proc import ProcessIdentity, spawn, terminate_group
from .tokens import Account

__all__ = ["Route", "ProxyMode", "PerAccountWebsockify", "RunningProxy", "websockify_argv", "wait_for_port"]

log = logging.getLogger("gateway.proxy")


@dataclass(frozen=True, slots=True)
class Route:
    """One Apache route: a public websocket path to a listener on 127.0.0.1."""

    account: str
    path: str
    port: int


@dataclass(slots=True)
class RunningProxy:
    process: asyncio.subprocess.Process
    identity: ProcessIdentity
    endpoint: Endpoint


class ProxyMode(abc.ABC):
    """How websockets reach VNC servers. Listeners bind to 127.0.0.1 only."""

    name: str

    @abc.abstractmethod
    def routes(self, accounts: Sequence[Account]) -> list[Route]:
        """The Apache routes for these accounts; fixed for the life of the gateway."""

    @abc.abstractmethod
    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        """Start forwarding ``account``'s websocket to ``endpoint``; return once it listens."""

    async def stop(self, proxy: RunningProxy) -> None:
        await terminate_group(proxy.identity, proc=proxy.process, grace_s=3)


def websockify_argv(listen_port: int, target: Endpoint, *, heartbeat_s: int) -> list[str]:
    # `python -m websockify` from the gateway's own environment: the version pinned with it.
    return [
        sys.executable, "-m", "websockify",
        "--heartbeat", str(heartbeat_s),
        f"127.0.0.1:{listen_port}",
        f"{target.host}:{target.port}",
    ]


class PerAccountWebsockify(ProxyMode):
    """One websockify process per account, on the account's websocket port (the original design)."""

    name = "per-account"

    def __init__(self, config: Config, logs_dir: Path) -> None:
        self.heartbeat_s = config.proxy.heartbeat_s
        self.logs_dir = logs_dir

    def routes(self, accounts: Sequence[Account]) -> list[Route]:
        return [Route(a.id, a.websocket_path, a.websocket_port) for a in accounts]

    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        argv = websockify_argv(account.websocket_port, endpoint, heartbeat_s=self.heartbeat_s)
        proc, identity = await spawn(argv, log_path=self.logs_dir / f"{account.id}.websockify.log")
        try:
            await wait_for_port("127.0.0.1", account.websocket_port, timeout_s=15, process=proc)
        except BaseException:
            await terminate_group(identity, proc=proc, grace_s=1)
            raise
        log.info("proxy started account=%s port=%d target=%s pid=%d",
                 account.id, account.websocket_port, endpoint, proc.pid)
        return RunningProxy(proc, identity, endpoint)


class ProxyStartError(Exception):
    pass


async def wait_for_port(host: str, port: int, *, timeout_s: float,
                        process: asyncio.subprocess.Process | None = None) -> None:
    """Return once a TCP connection to host:port succeeds; fail early if ``process`` exits."""
    delay = 0.02
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if process is not None and process.returncode is not None:
                    raise ProxyStartError(f"exited with status {process.returncode} before listening on {port}")
                try:
                    _, writer = await asyncio.open_connection(host, port)
                except OSError:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.25)
                    continue
                writer.close()
                await writer.wait_closed()
                return
    except TimeoutError:
        raise ProxyStartError(f"nothing listened on {host}:{port} within {timeout_s:g} s") from None
