"""The supervisor: brings up every account's desktop and proxy, watches them, and stops them.

Structure: one :class:`asyncio.TaskGroup` holds a task per account
(:class:`~gateway.supervisor.watcher.AccountWatcher`), one for the private Apache and one for the
progress display. Each account's task owns its desktop and its proxy for their whole life and
stops both in its ``finally``, so cancelling the group on SIGTERM takes everything down
concurrently, and an error in one account never touches another. :class:`Gateway` only starts
and stops: what a run needs once the state database is open (the store, the watchers, the web
front) are locals of :meth:`Gateway.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.backends import backend_name_for, make_backends
from gateway.backends.base import Backend, BackendError, DesktopState
from gateway.common.files import ensure_private_dir
from gateway.common.progress import Progress
from gateway.model.config import Config, parse_listen
from gateway.model.errors import UserError
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase
from gateway.model.tokens import TokenFile
from gateway.proxies.apache import novnc_dir
from gateway.proxies.base import ProxyMode
from gateway.proxies.modes import make_proxy_mode
from gateway.supervisor.commands import DesktopCommands
from gateway.supervisor.extend import EventExtension
from gateway.supervisor.front import WebFront, gateway_url, port_is_free
from gateway.supervisor.idle import IdleWatcher
from gateway.supervisor.recover import open_state_store, recover
from gateway.supervisor.watcher import AccountWatcher, EventContext
from gateway.web.app import make_app
from gateway.web.cockpit import GatewayMetrics, viewer_count
from gateway.web.thumbnails import ThumbnailService
from gateway.web.watch import WatchLinks, retire_view_only_password

__all__ = ["Gateway", "GatewayOptions"]

log = logging.getLogger("gateway")

#: How often expired share links are looked for (their view-only password is then replaced).
SHARE_LINK_CHECK_S = 5.0


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    state_dir: Path
    listen: str


class _Shutdown(Exception):
    """Raised inside the task group to cancel every task when a stop is requested."""


class Gateway:
    """One event's desktops, proxies and pages, from `gateway up` until SIGTERM."""

    def __init__(self, tokens: TokenFile, config: Config, options: GatewayOptions) -> None:
        self.tokens = tokens
        self.config = config
        self.options = options
        self.state_dir = options.state_dir
        self.logs_dir = options.state_dir / "logs"
        self.slots: dict[str, DesktopSlot] = {
            a.id: DesktopSlot(a, backend=backend_name_for(a, config),
                              keyboard_layout=config.desktop.keyboard_layout or "us")
            for a in tokens.accounts
        }
        try:
            self.backends: dict[str, Backend] = make_backends(config, options.state_dir, tokens.accounts)
        except BackendError as exc:
            raise UserError(str(exc)) from None
        self.proxy_mode: ProxyMode = make_proxy_mode(config, logs_dir=self.logs_dir, slots=self.slots,
                                                     runtime_dir=options.state_dir / "proxy")
        self.metrics = GatewayMetrics()
        self.changed = asyncio.Event()

    @property
    def url(self) -> str:
        return gateway_url(self.config, self.options.listen)

    # -- the whole life -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[str], None] | None = None) -> None:
        """Run until ``stop`` is set; everything started is stopped before this returns."""
        ensure_private_dir(self.state_dir)
        self.logs_dir.mkdir(exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            store = open_state_store(self.state_dir)
            stack.callback(store.close)
            wanted = {a.id: (a, self.slots[a.id].backend) for a in self.tokens.accounts}
            recovery = await recover(store, self.backends.get, wanted)
            self._check_ports_free(recovery.adopted)
            await self._open_backends(stack)
            context = EventContext(self.config, self.slots, store, self.proxy_mode, self.metrics,
                                   start_limit=asyncio.Semaphore(self.config.desktop.start_concurrency),
                                   changed=self.changed)
            held = self._hold(recovery.held(wanted))
            watchers = [AccountWatcher(context, account, self.backends[self.slots[account.id].backend],
                                       recovery.adopted.get(account.id))
                        for account in self.tokens.accounts if account.id not in held]
            commands = DesktopCommands({w.account.id: w.commands for w in watchers}, self.slots)
            idle = IdleWatcher(self.config.idle, self.slots, store, act=commands.act, notify=commands.notify,
                               count_viewers=viewer_count, input_known=self.config.proxy.mode == "builtin")
            extension = EventExtension(self.backends, self.slots, commands, idle, store)
            extension.restore()  # before any desktop starts: a job submitted now gets the extended limit
            #: The admin wall's thumbnails, grabbed only while the wall is open (gateway/web/thumbnails.py).
            thumbnails = ThumbnailService(self.config.wall, self.slots, self.state_dir)
            front = WebFront(self.config, self.state_dir, self.options.listen, store)
            cockpit = front.make_cockpit(self.slots, act=commands.act, metrics=self.metrics, thumbnails=thumbnails,
                                         extend=extension)
            app = make_app(self.config, self.slots, novnc=novnc_dir(self.config), store=store,
                           state_dir=self.state_dir, cockpit=cockpit,
                           set_keyboard_layout=commands.set_keyboard_layout)
            app.router.add_routes(self.proxy_mode.web_routes(self.tokens.accounts))
            apache = await front.serve(stack, app, cockpit, self.proxy_mode.routes(self.tokens.accounts))
            try:
                async with asyncio.TaskGroup() as group:
                    if apache is not None:
                        group.create_task(front.keep_apache(apache), name="apache")
                    for watcher in watchers:
                        group.create_task(watcher.run(), name=f"desktop:{watcher.account.id}")
                    group.create_task(self._report_progress(on_ready), name="progress")
                    group.create_task(thumbnails.run(), name="thumbnails")
                    group.create_task(idle.run(), name="idle")
                    group.create_task(self._retire_lapsed_share_links(store, commands), name="share-links")
                    await stop.wait()
                    log.info("stopping: %d desktops", len(self.slots))
                    raise _Shutdown
            except* _Shutdown:
                pass

    # -- start-up steps -------------------------------------------------------------------------

    async def _open_backends(self, stack: contextlib.AsyncExitStack) -> None:
        for name, backend in self.backends.items():
            accounts = [a for a in self.tokens.accounts if self.slots[a.id].backend == name]
            try:
                await backend.open(accounts)
            except BackendError as exc:
                raise UserError(f"backend {name}: {exc}") from None
            # Runs after every account's task has stopped its desktop: the event is over.
            stack.push_async_callback(backend.close, final=True)

    def _hold(self, held: Mapping[str, str]) -> Mapping[str, str]:
        """Show each held account as failed, saying why it has no desktop (see Recovery.held)."""
        for account_id, reason in held.items():
            self.slots[account_id].set(Phase.FAILED, f"its earlier desktop could not be stopped ({reason}); "
                                                     "stop it, then restart the gateway")
            log.error("no new desktop: the earlier one could not be stopped account=%s error=%s", account_id, reason)
        return held

    def _check_ports_free(self, adopted: Mapping[str, DesktopState]) -> None:
        """Refuse to start if a port the token file names is taken, before anything starts."""
        problems = []
        host, port = parse_listen(self.options.listen)
        if not port_is_free(host, port):
            problems.append(f"--listen {self.options.listen}: the port is already in use")
        for account in self.tokens.accounts:
            where = f"{self.tokens.path}:{account.line}"
            if not port_is_free("127.0.0.1", account.websocket_port):
                problems.append(f"{where}: websocketport {account.websocket_port} is already in use on this machine")
            if account.id not in adopted and account.is_local and not port_is_free("127.0.0.1", account.vnc_port):
                problems.append(f"{where}: vncport {account.vnc_port} is already in use on this machine")
        if problems:
            raise UserError("\n".join(problems))

    # -- while running ----------------------------------------------------------------------------

    async def _retire_lapsed_share_links(self, store: StateStore, commands: DesktopCommands) -> None:
        """A share link that expired must not keep working: its view-only password is replaced."""
        links = WatchLinks(store)
        while True:
            await asyncio.sleep(SHARE_LINK_CHECK_S)
            for account in links.lapsed(self.state_dir):
                if account in self.slots:
                    await retire_view_only_password(self.state_dir, account, commands.act, store, "share link expired")

    async def _report_progress(self, on_ready: Callable[[str], None] | None) -> None:
        progress = Progress(len(self.slots))
        started = time.monotonic()
        announced = False
        while True:
            counts = {phase: 0 for phase in Phase}
            for slot in self.slots.values():
                counts[slot.phase] += 1
            progress.update(counts[Phase.READY], counts[Phase.FAILED])
            settled = counts[Phase.READY] + counts[Phase.FAILED] == len(self.slots)
            if settled and not announced:
                progress.finish()
                elapsed = time.monotonic() - started
                log.info("desktops settled ready=%d failed=%d seconds=%.1f",
                         counts[Phase.READY], counts[Phase.FAILED], elapsed)
                if on_ready is not None:
                    on_ready(self._ready_message(counts, elapsed))
                announced = True
            self.changed.clear()
            await self.changed.wait()

    def _ready_message(self, counts: Mapping[Phase, int], elapsed: float) -> str:
        failed = counts[Phase.FAILED]
        lines = [f"{counts[Phase.READY]} of {len(self.slots)} desktops ready in {elapsed:.1f} s."]
        if failed:
            names = ", ".join(s.account.id for s in self.slots.values() if s.phase is Phase.FAILED)
            lines.append(f"{failed} failed: {names} (reasons on the landing page and in {self.logs_dir})")
        lines.append(f"Landing page: {self.url}")
        return "\n".join(lines)
