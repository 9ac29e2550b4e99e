"""The supervisor: brings up every account's desktop and proxy, watches them, and stops them.

Structure: one :class:`asyncio.TaskGroup` holds a task per account (:class:`AccountWatcher`), one
for the private Apache and one for the progress display. Each account's task owns its desktop and
its proxy for their whole life and stops both in its ``finally``, so cancelling the group on
SIGTERM takes everything down concurrently, and an error in one account never touches another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.common import rfb
from gateway.proxies.apache import ApacheLayout, PrivateApache, install_system_rules, novnc_dir, render_apache_config
from gateway.backends import backend_name_for, make_backends
from gateway.backends.base import Backend, BackendError, DesktopState, Endpoint, PollResult, Status
from gateway.web.cockpit import Cockpit, GatewayMetrics, load_or_create_admin_password, make_control_app
from gateway.model.config import Config, parse_listen
from gateway.backends.desktop_users import limits_in_force
from gateway.model.errors import UserError
from gateway.common.files import ensure_private_dir
from gateway.supervisor.idle import IdleWatcher, idle_watcher_for
from gateway.common.proc import terminate_group, is_alive
from gateway.common.progress import Progress
from gateway.proxies.websockify import ProxyMode, RunningProxy, make_proxy_mode
from gateway.model.restart import RestartPolicy
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase
from gateway.web.thumbnails import ThumbnailService
from gateway.model.tokens import Account, TokenFile
from gateway.web.watch import REFRESH_PASSWORDS, WatchLinks, retire_view_only_password
from gateway.web.app import make_app

__all__ = ["Gateway", "GatewayOptions"]

log = logging.getLogger("gateway")

RFB_PROBE_TIMEOUT_S = 3.0
#: A desktop whose backend can't say how it is (scheduler or host unreachable) for this long is
#: shown to organisers with the reason; it is never stopped for that.
UNKNOWN_REPORT_AFTER_S = 30.0
#: How often expired share links are looked for (their view-only password is then replaced).
SHARE_LINK_CHECK_S = 5.0
#: The control socket in the state dir (see gateway.web.cockpit).
CONTROL_SOCKET = "control.sock"


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    state_dir: Path
    listen: str


#: The watcher command that gives a running desktop more time: "extend:SECONDS" (see Gateway.extend).
EXTEND = "extend"
#: Requests whose caller waits until the watcher has carried them out (the part before ":").
AWAITED_COMMANDS = frozenset({REFRESH_PASSWORDS, EXTEND})
AWAITED_COMMAND_TIMEOUT_S = 30.0


@dataclass(slots=True)
class Command:
    """A request for one desktop's watcher (the only caller of its backend), with its outcome."""

    action: str
    done: asyncio.Future[str]

    def finish(self, outcome: str) -> None:
        if not self.done.done():
            self.done.set_result(outcome)


class _Shutdown(Exception):
    """Raised inside the task group to cancel every task when a stop is requested."""


class Gateway:
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
        #: The admin wall's thumbnails, grabbed only while the wall is open (gateway/web/thumbnails.py).
        self.thumbnails = ThumbnailService(config.wall, self.slots, options.state_dir)
        self.watchers: dict[str, AccountWatcher] = {}
        self.cockpit: Cockpit | None = None
        self.start_limit = asyncio.Semaphore(config.desktop.start_concurrency)
        self.changed = asyncio.Event()
        self.store: StateStore | None = None
        self.apache: PrivateApache | None = None
        self.web_port: int | None = None
        self.idle: IdleWatcher | None = None

    # -- the whole life -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[str], None] | None = None) -> None:
        """Run until ``stop`` is set; everything started is stopped before this returns."""
        ensure_private_dir(self.state_dir)
        self.logs_dir.mkdir(exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            self.store = StateStore(self.state_dir / "gateway.db")
            stack.callback(self.store.close)
            await self._clean_stale_services()
            adopted = await self._adopt_desktops()
            self._check_ports_free(adopted)
            await self._open_backends(stack)
            self.cockpit = self._make_cockpit()
            await self._start_control(stack)
            await self._start_web(stack)
            await self._start_front(stack)
            try:
                async with asyncio.TaskGroup() as group:
                    if self.apache is not None:
                        group.create_task(self._keep_apache(), name="apache")
                    for account in self.tokens.accounts:
                        watcher = AccountWatcher(self, account, adopted.get(account.id))
                        self.watchers[account.id] = watcher
                        group.create_task(watcher.run(), name=f"desktop:{account.id}")
                    group.create_task(self._report_progress(on_ready), name="progress")
                    group.create_task(self.thumbnails.run(), name="thumbnails")
                    self.idle = idle_watcher_for(self)
                    group.create_task(self.idle.run(), name="idle")
                    group.create_task(self._retire_lapsed_share_links(), name="share-links")
                    await stop.wait()
                    log.info("stopping: %d desktops", len(self.slots))
                    raise _Shutdown
            except* _Shutdown:
                pass

    @property
    def url(self) -> str:
        if self.config.public_url:
            return self.config.public_url
        scheme = "https" if self.config.tls.enabled else "http"
        host, port = parse_listen(self.options.listen)
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}/"

    # -- organisers' requests -----------------------------------------------------------------

    async def act(self, account_id: str, action: str) -> str:
        """Hand an organiser's request to the account's watcher; it acts between its checks."""
        watcher = self.watchers.get(account_id)
        if watcher is None:
            raise LookupError(f"no desktop {account_id}")
        command = Command(action, asyncio.get_running_loop().create_future())
        watcher.commands.put_nowait(command)
        log.info("request queued account=%s action=%s", account_id, action)
        if action.split(":", 1)[0] in AWAITED_COMMANDS:  # the caller relies on it being done
            async with asyncio.timeout(AWAITED_COMMAND_TIMEOUT_S):
                return await command.done
        return f"{action} requested"

    async def extend(self, seconds: float, accounts: list[str] | None, actor: str) -> list[str]:
        """`gateway extend` and the admin page: the event and its running desktops get ``seconds`` more.

        First what belongs to the whole event (the Slurm reservation the gateway made, the limit of jobs
        submitted from now on, the idle policy's event window), then each running desktop through its
        own watcher (a Slurm job's TimeLimit). Returns one line per thing done or refused; every line is
        written to the audit log.
        """
        assert self.store is not None
        wanted = list(self.slots) if accounts is None else accounts
        unknown = [a for a in wanted if a not in self.slots]
        if unknown:
            raise LookupError(f"no desktop {', '.join(unknown)}")
        lines: list[str] = []
        done: set[str] = set()  # a reservation that two backends share is extended once
        for name, backend in self.backends.items():
            if not any(self.slots[a].backend == name for a in wanted):
                continue
            try:
                lines += await backend.extend_event(seconds, done)
            except BackendError as exc:
                lines.append(str(exc))
        lines += self.extend_event_window(seconds, None if accounts is None else wanted)
        results = await asyncio.gather(*(self._extend_one(a, seconds) for a in wanted))
        lines += [f"{account}: {result}" for account, result in zip(wanted, results)]
        for line in lines:
            self.store.record_event("extend", line.split(":", 1)[0] if line.split(":", 1)[0] in self.slots else None,
                                    f"by {actor}: +{seconds / 60:g} min: {line}")
        return lines

    def extend_event_window(self, seconds: float, accounts: list[str] | None) -> list[str]:
        """The idle policy's event window (and the end warnings that follow it) ends later."""
        watcher = self.idle
        if watcher is None or watcher.policy.window is None:
            return []
        end = watcher.extend_window(seconds, accounts)
        return [f"event window (idle policy): now ends {end}" + ("" if accounts is None else f" for {', '.join(accounts)}")]

    async def _extend_one(self, account_id: str, seconds: float) -> str:
        slot = self.slots[account_id]
        if slot.phase is not Phase.READY:
            return f"not extended: the desktop is {slot.phase.value}"
        try:
            return await self.act(account_id, f"{EXTEND}:{seconds:g}")
        except TimeoutError:
            return "not extended: its watcher did not answer in time"

    async def set_keyboard_layout(self, account_id: str, layout: str) -> None:
        """Apply a participant's keyboard layout to their running desktop (BackendError if it can't)."""
        watcher = self.watchers[account_id]
        if watcher.state is None or watcher.slot.phase is not Phase.READY:
            raise BackendError("the desktop is not running")
        await watcher.backend.set_keyboard_layout(watcher.account, watcher.state, layout)
        watcher.slot.keyboard_layout = layout
        assert self.store is not None
        self.store.record_event("keyboard-layout", account_id, layout)

    async def _retire_lapsed_share_links(self) -> None:
        """A share link that expired must not keep working: its view-only password is replaced."""
        assert self.store is not None
        links = WatchLinks(self.store)
        while True:
            await asyncio.sleep(SHARE_LINK_CHECK_S)
            for account in links.lapsed(self.state_dir):
                if account in self.watchers:
                    await retire_view_only_password(self.state_dir, account, self.act, self.store, "share link expired")

    def _make_cockpit(self) -> Cockpit:
        assert self.store is not None
        configured = self.config.admin.password_file
        password_file = Path(configured) if configured else self.state_dir / "secrets" / "admin.password"
        return Cockpit(slots=self.slots, store=self.store, act=self.act, metrics=self.metrics,
                       admin_user=self.config.admin.user,
                       admin_password=load_or_create_admin_password(password_file),
                       thumbnails=self.thumbnails, state_dir=self.state_dir,
                       isolation=limits_in_force(self.config), extend=self.extend)

    async def _start_control(self, stack: contextlib.AsyncExitStack) -> None:
        """`gateway status` and friends talk to this Unix socket; only our own user may open it."""
        assert self.cockpit is not None
        path = self.state_dir / CONTROL_SOCKET
        path.unlink(missing_ok=True)
        runner = web.AppRunner(make_control_app(self.cockpit), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        old_umask = os.umask(0o177)  # the socket is created 0600, never briefly open to others
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old_umask)

    # -- start-up steps -------------------------------------------------------------------------

    def backend_for(self, account: Account) -> Backend:
        return self.backends[self.slots[account.id].backend]

    async def _open_backends(self, stack: contextlib.AsyncExitStack) -> None:
        for name, backend in self.backends.items():
            accounts = [a for a in self.tokens.accounts if self.slots[a.id].backend == name]
            try:
                await backend.open(accounts)
            except BackendError as exc:
                raise UserError(f"backend {name}: {exc}") from None
            # Runs after every account's task has stopped its desktop: the event is over.
            stack.push_async_callback(backend.close, final=True)

    async def _clean_stale_services(self) -> None:
        """Stop proxies and Apache that a crashed gateway left behind; they are restartable."""
        assert self.store is not None
        for name, identity in self.store.services().items():
            if is_alive(identity):
                log.warning("stopping leftover service=%s pid=%d", name, identity.pid)
                await terminate_group(identity, grace_s=3)
            self.store.forget_service(name)

    async def _adopt_desktops(self) -> dict[str, DesktopState]:
        """Keep the desktops an earlier gateway left running; stop those no longer wanted."""
        assert self.store is not None
        accounts = self.tokens.by_id()
        adopted: dict[str, DesktopState] = {}
        for record in self.store.desktops().values():
            account = accounts.get(record.account)
            backend = self.backends.get(record.backend)
            if backend is None:
                # Written by a backend this configuration no longer uses; leave it, and say so.
                log.error("desktop of an unconfigured backend left alone account=%s backend=%s",
                          record.account, record.backend)
                continue
            if account is None or self.slots[account.id].backend != record.backend:
                log.warning("desktop no longer wanted, stopping account=%s", record.account)
                with contextlib.suppress(Exception):
                    await backend.stop(account or _placeholder(record.account), record.state)
                self.store.forget_desktop(record.account)
                continue
            result = await backend.adopt(account, record.state)
            if result.status in (Status.RUNNING, Status.PENDING):
                log.info("desktop adopted account=%s backend=%s", account.id, record.backend)
                self.store.record_event("adopted", account.id)
                adopted[account.id] = record.state
            elif result.status is Status.UNKNOWN:
                # Can't tell (scheduler or host unreachable): keep it and let the watcher find out.
                log.warning("desktop state unknown, keeping account=%s reason=%s", account.id, result.reason)
                adopted[account.id] = record.state
            else:
                await backend.stop(account, record.state)
                self.store.forget_desktop(account.id)
        return adopted

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

    async def _start_web(self, stack: contextlib.AsyncExitStack) -> None:
        app = make_app(self.config, self.slots, novnc=novnc_dir(self.config), store=self.store,
                       state_dir=self.state_dir, cockpit=self.cockpit,
                       set_keyboard_layout=self.set_keyboard_layout)
        app.router.add_routes(self.proxy_mode.web_routes(self.tokens.accounts))
        self.customise_app(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if self.config.apache.mode == "private":
            site = web.TCPSite(runner, "127.0.0.1", 0)  # Apache is the front; any free port will do
        else:
            host, port = parse_listen(self.options.listen)
            tls = self._tls_context() if self.config.apache.mode == "none" else None
            site = web.TCPSite(runner, host, port, ssl_context=tls)
        await site.start()
        server = site._server  # aiohttp reports the bound port only through the server's sockets
        assert server is not None and server.sockets
        self.web_port = server.sockets[0].getsockname()[1]
        log.info("web app listening port=%d", self.web_port)

    def customise_app(self, app: web.Application) -> None:
        """A hook for variants of the gateway (after the event: the pages' notice); nothing here."""

    def _tls_context(self) -> ssl.SSLContext | None:
        """Without Apache the gateway serves https itself when a certificate is configured."""
        tls = self.config.tls
        if not tls.enabled:
            return None
        assert tls.cert is not None and tls.key is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"tls.cert/tls.key: cannot load {tls.cert}: {exc}") from None
        return context

    async def _start_front(self, stack: contextlib.AsyncExitStack) -> None:
        assert self.web_port is not None
        if self.config.apache.mode == "none":
            return  # the web app itself listens on --listen
        routes = self.proxy_mode.routes(self.tokens.accounts)
        if self.config.apache.mode == "system":
            text = render_apache_config(self.config, routes, web_port=self.web_port, layout=None,
                                        listen=self.options.listen)
            await install_system_rules(self.config, text)
            return
        layout = ApacheLayout(self.state_dir / "apache")
        apache = PrivateApache(self.config, layout)
        text = render_apache_config(self.config, routes, web_port=self.web_port, layout=layout,
                                    listen=self.options.listen)
        await apache.write_config(text)
        await self._launch_apache(apache)
        self.apache = apache
        stack.push_async_callback(self._stop_apache)

    async def _launch_apache(self, apache: PrivateApache) -> None:
        assert self.store is not None
        _, identity = await apache.start(self.options.listen)
        self.store.save_service("apache", identity)

    async def _stop_apache(self) -> None:
        if self.apache is not None:
            await self.apache.stop()
            assert self.store is not None
            self.store.forget_service("apache")

    async def _keep_apache(self) -> None:
        """Restart the private Apache if it dies; participants' tunnels reconnect by themselves."""
        assert self.apache is not None
        policy = RestartPolicy(self.config.restart)
        while True:
            assert self.apache.process is not None and self.apache.identity is not None
            status = await self.apache.process.wait()
            log.error("apache exited status=%s", status)
            # Its workers may outlive it for a moment, still holding the listening socket.
            await terminate_group(self.apache.identity, proc=self.apache.process, grace_s=2)
            delay = policy.next_delay()
            if delay is None:
                log.error("apache keeps failing; giving up (see %s)", self.apache.layout.error_log)
                return
            await asyncio.sleep(delay)
            await self._launch_apache(self.apache)

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

    # -- used by the account watchers ----------------------------------------------------------

    def publish(self, slot: DesktopSlot, phase: Phase, reason: str = "") -> None:
        if slot.phase is not phase or slot.reason != reason:
            slot.set(phase, reason)
            self.changed.set()


class AccountWatcher:
    """Owns one account's desktop and proxy: start, prove ready, watch, restart, and stop.

    Organisers' requests (restart, stop, start, disconnect) arrive on :attr:`commands` and are
    handled between checks, so only this task ever drives the account's backend and proxy.
    """

    def __init__(self, gateway: Gateway, account: Account, adopted: DesktopState | None) -> None:
        self.gateway = gateway
        self.account = account
        self.slot = gateway.slots[account.id]
        self.backend = gateway.backend_for(account)
        self.state: DesktopState | None = adopted
        self.endpoint: Endpoint | None = None
        self.proxy: RunningProxy | None = None
        self.commands: asyncio.Queue[Command] = asyncio.Queue()
        self.desktop_policy = RestartPolicy(gateway.config.restart)
        self.proxy_policy = RestartPolicy(gateway.config.restart)
        self.unknown_since: float | None = None

    @property
    def store(self) -> StateStore:
        assert self.gateway.store is not None
        return self.gateway.store

    def _persist(self, write: Callable[..., None], *args: object) -> None:
        """Write to the state database; if that fails (disk full), the desktop carries on regardless.

        The organiser is told: until a write succeeds, a crash of the gateway would lose track of
        this desktop's latest state.
        """
        try:
            write(*args)
        except sqlite3.Error as exc:
            log.error("state not saved account=%s error=%s", self.account.id, exc)
            self.slot.reason = f"cannot save the gateway's state: {exc}"
            self.gateway.changed.set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._lifecycle()
                except Exception as exc:
                    # A bug or an unexpected error fails this account only; the others carry on.
                    log.exception("desktop watcher crashed account=%s", self.account.id)
                    self.gateway.publish(self.slot, Phase.FAILED, f"internal error: {exc}")
                # Failed or stopped: stay so, visibly, until an organiser starts it again.
                await self._wait_for_start()
        finally:
            await self._teardown()

    async def _wait_for_start(self) -> None:
        while (command := await self.commands.get()).action not in ("start", "restart"):
            log.info("command ignored while %s account=%s command=%s", self.slot.phase.value, self.account.id,
                     command.action)
            command.finish(f"nothing to do: the desktop is {self.slot.phase.value}")
        command.finish(f"{command.action} done")
        self.desktop_policy = RestartPolicy(self.gateway.config.restart)
        self.gateway.publish(self.slot, Phase.QUEUED, "started by the organiser")

    async def _lifecycle(self) -> None:
        """Keep the desktop up; returns when it failed for good or an organiser stopped it."""
        while True:
            failure = await self._bring_up()
            if failure is None:
                outcome = await self._watch()
                if outcome == "stop":
                    await self._stop_proxy()
                    await self._stop_desktop()
                    self.gateway.publish(self.slot, Phase.STOPPED, "stopped by the organiser")
                    return
                if outcome == "restart":
                    await self._stop_desktop()
                    self.gateway.publish(self.slot, Phase.STARTING, "restarted by the organiser")
                    continue
                failure = outcome
            delay = self.desktop_policy.next_delay()
            log.warning("desktop down account=%s reason=%s", self.account.id, failure)
            self._persist(self.store.record_event, "desktop-down", self.account.id, failure)
            await self._stop_desktop()
            if delay is None:
                self.gateway.publish(self.slot, Phase.FAILED, failure)
                log.error("desktop failed, giving up account=%s reason=%s", self.account.id, failure)
                return
            self.slot.restarts += 1
            self.gateway.publish(self.slot, Phase.STARTING, f"restarting: {failure}")
            await asyncio.sleep(delay)

    async def _bring_up(self) -> str | None:
        """Start (unless adopted), prove readiness, start the proxy. None on success, else why not."""
        started = time.monotonic()
        fresh = self.state is None
        if fresh:
            async with self.gateway.start_limit:
                self.gateway.publish(self.slot, Phase.STARTING, self.slot.reason)
                try:
                    self.state = await self.backend.start(self.account)
                except BackendError as exc:
                    return str(exc)
                except OSError as exc:
                    log.exception("desktop start failed account=%s", self.account.id)
                    return f"could not start: {exc}"
                self._persist(self.store.save_desktop, self.account.id, self.backend.name, self.state)
        # Waiting in a scheduler's queue holds no start slot: others may start meanwhile.
        failure = await self._wait_running()
        if failure is None:
            async with self.gateway.start_limit:
                failure = await self._prove_ready()
        if failure is None:
            failure = await self._ensure_proxy()
        if failure is not None:
            return failure
        self.desktop_policy.record_healthy()
        self.slot.output_tail = ""
        if fresh:
            self.gateway.metrics.spawn_seconds.observe(time.monotonic() - started)
        # A backend's note (e.g. why an account got VNC instead of DCV) stays visible while ready.
        self.gateway.publish(self.slot, Phase.READY, self.slot.detail.get("note", ""))
        return None

    async def _wait_running(self) -> str | None:
        """Poll until the desktop runs and its endpoint is known. Time in a queue is not limited."""
        assert self.state is not None
        timeout_s = self.gateway.config.desktop.start_timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            result = await self.backend.poll(self.account, self.state)
            if result.status is Status.GONE:
                return self._gone(result, "the desktop exited while starting")
            if result.status is Status.RUNNING and result.endpoint is not None:
                await self._set_endpoint(result.endpoint)
                return None
            if result.status is Status.PENDING:
                self.gateway.publish(self.slot, Phase.QUEUED, result.reason)
                deadline = time.monotonic() + timeout_s
                delay = 1.0  # a queue moves in seconds, not milliseconds
            elif time.monotonic() > deadline:
                return f"did not run within {timeout_s:g} s ({result.reason or result.status.value})"
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _gone(self, result: PollResult, default: str) -> str:
        """Why the desktop went; what it printed last is kept for organisers (status, admin page)."""
        if result.output_tail:
            self.slot.output_tail = result.output_tail
            self.gateway.changed.set()
        self.slot.ends_at = None
        return result.reason or default

    async def _set_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.slot.endpoint = endpoint
        self.slot.detail = dict(self.backend.describe(self.state or {}))
        self.slot.protocol = self.backend.protocol(self.state or {})
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
            self.slot.endpoint_ip = str(infos[0][4][0])
        except OSError:
            self.slot.endpoint_ip = None
        if self.slot.phase is Phase.QUEUED:
            self.gateway.publish(self.slot, Phase.STARTING)

    async def _prove_ready(self) -> str | None:
        """Ready means an RFB server answers with its banner at the desktop's endpoint; never a sleep."""
        assert self.state is not None and self.endpoint is not None
        timeout_s = self.gateway.config.desktop.start_timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        last_error = "no answer"
        while time.monotonic() < deadline:
            try:
                # An RFB handshake unless the backend knows better (a DCV web server answering).
                await self.backend.prove_ready(self.account, self.state, self.endpoint)
                return None
            except (OSError, TimeoutError, rfb.RfbError, BackendError) as exc:
                last_error = str(exc) or type(exc).__name__
            result = await self.backend.poll(self.account, self.state)
            if result.status is Status.GONE:
                return self._gone(result, "the desktop exited while starting")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        what = "no RFB handshake" if self.slot.protocol == "vnc" else f"its {self.slot.protocol} server did not answer"
        return f"{what} within {timeout_s:g} s ({last_error})"

    async def _ensure_proxy(self) -> str | None:
        assert self.endpoint is not None
        if self.proxy is not None and self.proxy.alive and self.proxy.endpoint == self.endpoint:
            return None
        if self.slot.protocol != "vnc":
            # Not a VNC server: participants reach it through its own authenticated route (e.g.
            # /dcv/ACCOUNT/, gateway.web.dcv_proxy), never through the unauthenticated websocket proxy.
            await self._stop_proxy()
            self.proxy = RunningProxy(self.account.id, self.endpoint)
            return None
        await self._stop_proxy()
        try:
            self.proxy = await self.gateway.proxy_mode.start(self.account, self.endpoint)
        except Exception as exc:  # a proxy that won't start is this account's failure, not the gateway's
            return f"proxy did not start: {exc}"
        if self.proxy.identity is not None:
            self._persist(self.store.save_service, f"proxy:{self.account.id}", self.proxy.identity)
        return None

    async def _watch(self) -> str:
        """Watch desktop and proxy until the desktop is gone or an organiser acts.

        Returns "stop" or "restart" for an organiser's request, else why the desktop went.
        """
        interval = self.gateway.config.desktop.poll_interval_s
        while True:
            assert self.proxy is not None and self.state is not None
            event, value = await self._next_event(interval)
            if event == "command":
                assert isinstance(value, Command)
                if value.action == REFRESH_PASSWORDS:
                    await self._refresh_passwords(value)
                    continue
                if value.action.startswith(f"{EXTEND}:"):
                    await self._extend(value)
                    continue
                value.finish(f"{value.action} done")
                if value.action in ("stop", "restart"):
                    log.info("organiser request account=%s command=%s", self.account.id, value.action)
                    return value.action
                if value.action == "disconnect":
                    await self._stop_proxy()
                    failure = await self._ensure_proxy()
                    if failure is not None:
                        return failure
                continue
            if event == "proxy-exited":
                failure = await self._restart_proxy(int(value))
                if failure is not None:
                    return failure
                continue
            result = await self.backend.poll(self.account, self.state)
            if result.status is Status.GONE:
                return self._gone(result, "the desktop exited")
            if result.status is Status.RUNNING:
                self.slot.ends_at = result.ends_at
            self._note_unknown(result.status, result.reason)
            await self._maintain()

    async def _extend(self, command: Command) -> None:
        assert self.state is not None
        seconds = float(command.action.split(":", 1)[1])
        try:
            command.finish(await self.backend.extend(self.account, self.state, seconds))
        except (BackendError, OSError) as exc:  # the desktop carries on with its old limit; the caller hears why
            log.error("desktop not extended account=%s error=%s", self.account.id, exc)
            command.finish(f"not extended: {exc}")

    async def _refresh_passwords(self, command: Command) -> None:
        assert self.state is not None
        try:
            await self.backend.refresh_passwords(self.account, self.state)
        except (BackendError, OSError) as exc:  # the desktop carries on; the caller and the log hear why
            log.error("password file not rewritten account=%s error=%s", self.account.id, exc)
            command.finish(f"password file not rewritten: {exc}")
            return
        command.finish("password file rewritten")

    async def _next_event(self, interval: float) -> tuple[str, object]:
        """Whichever comes first: an organiser's command, the proxy exiting, or the poll interval."""
        assert self.proxy is not None
        command = asyncio.ensure_future(self.commands.get())
        proxy_exit = asyncio.ensure_future(self.proxy.wait())
        try:
            await asyncio.wait((command, proxy_exit), timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (command, proxy_exit):
                waiter.cancel()
            await asyncio.gather(command, proxy_exit, return_exceptions=True)
        # A command taken from the queue is never dropped, even if it arrived while cancelling.
        if command.done() and not command.cancelled():
            return "command", command.result()
        if proxy_exit.done() and not proxy_exit.cancelled() and proxy_exit.exception() is None:
            return "proxy-exited", proxy_exit.result()
        return "poll", None

    def _note_unknown(self, status: Status, reason: str) -> None:
        """A desktop whose state can't be told for a while stays up, but organisers are told."""
        if status is not Status.UNKNOWN:
            if self.unknown_since is not None:
                self.unknown_since = None
                self.gateway.publish(self.slot, Phase.READY)
            return
        now = time.monotonic()
        self.unknown_since = self.unknown_since or now
        if now - self.unknown_since >= UNKNOWN_REPORT_AFTER_S:
            seconds = int(now - self.unknown_since)
            self.gateway.publish(self.slot, Phase.READY, f"cannot check this desktop for {seconds} s: {reason}")

    async def _restart_proxy(self, status: int) -> str | None:
        log.warning("proxy exited account=%s status=%d", self.account.id, status)
        self._persist(self.store.record_event, "proxy-down", self.account.id, f"status {status}")
        self.gateway.metrics.proxy_errors.labels(self.account.id).inc()
        self.proxy = None
        delay = self.proxy_policy.next_delay()
        if delay is None:
            return "the proxy keeps exiting"
        # The first restart is immediate: a participant is probably waiting on the other end.
        if self.proxy_policy.restarts > 1:
            await asyncio.sleep(delay)
        failure = await self._ensure_proxy()
        if failure is None:
            self.proxy_policy.record_healthy()
        return failure

    async def _maintain(self) -> None:
        if self.state is not None:
            new_state = await self.backend.maintain(self.account, self.state)
            if new_state is not None:
                self.state = new_state
                self._persist(self.store.save_desktop, self.account.id, self.backend.name, new_state)

    async def _stop_proxy(self) -> None:
        if self.proxy is not None:
            await self.gateway.proxy_mode.stop(self.proxy)
            self.proxy = None
            self._persist(self.store.forget_service, f"proxy:{self.account.id}")

    async def _stop_desktop(self) -> None:
        if self.state is not None:
            await self.backend.stop(self.account, self.state)
            self.state = None
            self._persist(self.store.forget_desktop, self.account.id)
        self.slot.endpoint = self.slot.endpoint_ip = None
        self.slot.detail = {}

    async def _teardown(self) -> None:
        for step in (self._stop_proxy, self._stop_desktop):
            try:
                await step()
            except Exception:
                log.exception("stopping failed account=%s step=%s", self.account.id, step.__name__)
        self.slot.set(Phase.STOPPED)


def _placeholder(account_id: str) -> Account:
    """An account record for stopping a desktop whose line was removed from the token file."""
    return Account(account_id, "localhost", f"/{account_id}", 1024, 1, "", 0)


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
