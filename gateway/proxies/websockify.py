"""``proxy.mode`` per-account and shared: websockify processes that Apache forwards each account's websocket to.

* ``per-account`` (:class:`PerAccountWebsockify`): one websockify process per account, each forked
  from one pre-loaded parent (:mod:`gateway.proxies.websockify_server`);
* ``shared`` (:class:`SharedWebsockify`): one websockify with its TokenFile plugin; each account's
  Apache route carries a random secret token that the token file maps to the account's desktop.

The third mode, ``builtin``, is :class:`gateway.proxies.relay.BuiltinRelay`; what the modes share is
:mod:`gateway.proxies.base`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.common.files import atomic_write
from gateway.common.proc import (
    ProcessIdentity,
    process_start_time,
    spawn_listening,
    stop_unless_listening,
    terminate_group,
)
from gateway.model.config import Config
from gateway.model.status import Endpoint
from gateway.model.tokens import Account
from gateway.proxies.base import ProxyMode, Route, RunningProxy, reported_as_start_error
from gateway.proxies.websockify_server import ForkServer, ProxySpec

__all__ = ["PerAccountWebsockify", "SharedWebsockify", "websockify_argv"]

log = logging.getLogger("gateway.proxy")

#: How long a websockify may take to listen after it was started.
LISTEN_TIMEOUT_S = 15

def websockify_argv(listen_port: int, target: Endpoint | Path, *, heartbeat_s: int) -> list[str]:
    """websockify for one target endpoint, or (given a token file) for the targets it lists."""
    # `python -m websockify` from the gateway's own environment: the version pinned with it.
    argv = [sys.executable, "-m", "websockify", "--heartbeat", str(heartbeat_s)]
    if isinstance(target, Path):
        return argv + ["--token-plugin", "TokenFile", "--token-source", str(target), f"127.0.0.1:{listen_port}"]
    return argv + [f"127.0.0.1:{listen_port}", f"{target.host}:{target.port}"]


class PerAccountWebsockify(ProxyMode):
    """One websockify process per account, on the account's websocket port (the original design).

    Each is forked from one pre-loaded parent (:class:`gateway.proxies.websockify_server.ForkServer`) instead
    of starting an interpreter of its own: same process per account, same command line, log, kill
    and restart behaviour, at a fraction of the start-up CPU and memory.
    """

    name = "per-account"

    def __init__(self, config: Config, logs_dir: Path) -> None:
        self.heartbeat_s = config.proxy.heartbeat_s
        self.auth_timeout_s = config.proxy.auth_timeout_s
        self.logs_dir = logs_dir
        self.server = ForkServer(logs_dir / "websockify-server.log")
        self._starting = 0

    def routes(self, accounts: Sequence[Account]) -> list[Route]:
        return [Route(a.id, a.websocket_path, a.websocket_port) for a in accounts]

    def spec(self, account: Account, endpoint: Endpoint) -> ProxySpec:
        return ProxySpec(account.websocket_port, endpoint.host, endpoint.port, self.heartbeat_s,
                         str(self.logs_dir / f"{account.id}.websockify.log"),
                         tuple(websockify_argv(account.websocket_port, endpoint, heartbeat_s=self.heartbeat_s)),
                         self.auth_timeout_s)

    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        self._starting += 1
        try:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            proc = await self.server.fork(self.spec(account, endpoint))
            # The child leads its own session: its process group is its pid, as with spawn().
            identity = ProcessIdentity(proc.pid, proc.pid, process_start_time(proc.pid) or 0)
            with reported_as_start_error():
                await stop_unless_listening(proc, identity, host="127.0.0.1",  # type: ignore[arg-type]
                                            port=account.websocket_port, timeout_s=LISTEN_TIMEOUT_S)
        finally:
            self._starting -= 1
        log.info("proxy started account=%s port=%d target=%s pid=%d",
                 account.id, account.websocket_port, endpoint, proc.pid)
        return RunningProxy(account.id, endpoint, proc, identity)

    async def stop(self, proxy: RunningProxy) -> None:
        await super().stop(proxy)
        # The last account stopped (the gateway is shutting down): the fork server goes too.
        if not self._starting and self.server.live_children() == 0:
            await self.server.close()


class SharedWebsockify(ProxyMode):
    """One websockify for every account, with websockify's TokenFile plugin.

    Each account gets a random token (never its password or id) for the life of this gateway;
    its Apache route asks the shared websockify for ``/?token=TOKEN``, and the token file
    (0600, rewritten atomically; websockify re-reads it on every connection) maps the token to
    the account's current endpoint. A browser cannot choose the token: Apache adds it.

    The process is started by the first :meth:`start`, restarted by the next one after it died
    (every account's watcher sees it die), and stopped when the last account stops.
    """

    name = "shared"

    def __init__(self, config: Config, logs_dir: Path, runtime_dir: Path) -> None:
        self.heartbeat_s = config.proxy.heartbeat_s
        self.logs_dir = logs_dir
        self.token_file = runtime_dir / "websockify-tokens"
        self.port = config.proxy.shared_port or _free_loopback_port()
        self._tokens: dict[str, str] = {}
        self._targets: dict[str, Endpoint] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._identity: ProcessIdentity | None = None
        self._lock = asyncio.Lock()

    def token(self, account_id: str) -> str:
        return self._tokens.setdefault(account_id, secrets.token_urlsafe(24))

    def routes(self, accounts: Sequence[Account]) -> list[Route]:
        return [Route(a.id, a.websocket_path, self.port, f"/?token={self.token(a.id)}", nocanon=True)
                for a in accounts]

    def _write_tokens(self) -> None:
        lines = [f"{self.token(account)}: {target.host}:{target.port}\n"
                 for account, target in sorted(self._targets.items())]
        atomic_write(self.token_file, "".join(lines), mode=0o600)

    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        async with self._lock:
            if self._targets.get(account.id) != endpoint:
                self._targets[account.id] = endpoint
                self._write_tokens()
            if self._process is None or self._process.returncode is not None:
                await self._start_process()
            assert self._process is not None
            return RunningProxy(account.id, endpoint, self._process, self._identity)

    async def _start_process(self) -> None:
        if self._identity is not None:  # died: make sure no child of it still holds the port
            await terminate_group(self._identity, proc=self._process, grace_s=1)
        argv = websockify_argv(self.port, self.token_file, heartbeat_s=self.heartbeat_s)
        with reported_as_start_error():
            proc, identity = await spawn_listening(argv, host="127.0.0.1", port=self.port, timeout_s=LISTEN_TIMEOUT_S,
                                                   log_path=self.logs_dir / "shared.websockify.log")
        self._process, self._identity = proc, identity
        log.info("shared proxy started port=%d accounts=%d pid=%d", self.port, len(self._targets), proc.pid)

    async def stop(self, proxy: RunningProxy) -> None:
        async with self._lock:
            if self._targets.pop(proxy.account, None) is not None:
                self._write_tokens()
            if not self._targets and self._identity is not None:
                await terminate_group(self._identity, proc=self._process, grace_s=3)
                self._process = self._identity = None
        proxy.mark_stopped()


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
