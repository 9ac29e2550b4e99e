"""One desktop's life: :class:`AccountWatcher` starts it, proves it ready, watches, restarts and stops it.

The watcher is the only caller of its desktop's backend and proxy. Everything else sends it a
:class:`~gateway.supervisor.commands.Command` on :attr:`AccountWatcher.commands`; it carries them
out between its checks. What all watchers of one gateway share (the state database, the start
limit, the slots everyone reads) is the frozen :class:`EventContext`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.backends.base import Backend, BackendError, DesktopState, PollResult, Status
from gateway.common import rfb
from gateway.common.polling import Backoff, PollTimeout, poll_until
from gateway.model.actions import Action
from gateway.model.config import Config
from gateway.model.restart import RestartPolicy
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Endpoint, Phase
from gateway.model.tokens import Account
from gateway.proxies.base import ProxyMode, RunningProxy
from gateway.supervisor.commands import NOTIFY_TIMEOUT_S, Command
from gateway.web.cockpit import GatewayMetrics

__all__ = ["AccountWatcher", "EventContext", "Ending", "WatchOutcome"]

log = logging.getLogger("gateway")

#: A desktop whose backend can't say how it is (scheduler or host unreachable) for this long is
#: shown to organisers with the reason; it is never stopped for that.
UNKNOWN_REPORT_AFTER_S = 30.0
#: Polls while a desktop starts: quick at first, then at most every second (a queue moves in seconds).
STARTING_BACKOFF = Backoff(first_s=0.05, factor=1.5, max_s=1.0)
PENDING_POLL_S = 1.0
#: RFB handshakes tried while a desktop becomes ready.
READY_BACKOFF = Backoff(first_s=0.05, factor=1.5, max_s=0.5)


@dataclass(frozen=True, slots=True)
class EventContext:
    """What every watcher of one running gateway shares; made once the state database is open."""

    config: Config
    slots: Mapping[str, DesktopSlot]
    store: StateStore
    proxy_mode: ProxyMode
    metrics: GatewayMetrics
    #: Desktops starting at once (``desktop.start_concurrency``).
    start_limit: asyncio.Semaphore
    #: Set whenever a slot changes (the progress display waits on it).
    changed: asyncio.Event

    def publish(self, slot: DesktopSlot, phase: Phase, reason: str = "") -> None:
        if slot.phase is not phase or slot.reason != reason:
            slot.set(phase, reason)
            self.changed.set()


class Ending(enum.Enum):
    """How watching a ready desktop ended."""

    STOP = "stop"  # an organiser stopped it
    RESTART = "restart"  # an organiser restarted it
    FAILED = "failed"  # the desktop or its proxy went; the reason says why


@dataclass(frozen=True, slots=True)
class WatchOutcome:
    ending: Ending
    reason: str = ""


class AccountWatcher:
    """Owns one account's desktop and proxy: start, prove ready, watch, restart, and stop.

    Requests (organisers' actions, keyboard layout, notices, extensions) arrive on :attr:`commands`
    and are handled between checks, so only this task ever drives the account's backend and proxy.
    """

    def __init__(self, context: EventContext, account: Account, backend: Backend,
                 adopted: DesktopState | None) -> None:
        self.context = context
        self.store = context.store
        self.account = account
        self.slot = context.slots[account.id]
        self.backend = backend
        self.state: DesktopState | None = adopted
        self.endpoint: Endpoint | None = None
        self.proxy: RunningProxy | None = None
        self.commands: asyncio.Queue[Command] = asyncio.Queue()
        self.desktop_policy = RestartPolicy(context.config.restart)
        self.proxy_policy = RestartPolicy(context.config.restart)
        self.unknown_since: float | None = None

    def _publish(self, phase: Phase, reason: str = "") -> None:
        self.context.publish(self.slot, phase, reason)

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
            self.context.changed.set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._lifecycle()
                except Exception as exc:
                    # A bug or an unexpected error fails this account only; the others carry on.
                    log.exception("desktop watcher crashed account=%s", self.account.id)
                    self._publish(Phase.FAILED, f"internal error: {exc}")
                # Failed or stopped: stay so, visibly, until an organiser starts it again.
                await self._wait_for_start()
        finally:
            await self._teardown()

    async def _wait_for_start(self) -> None:
        while (command := await self.commands.get()).action not in (Action.START, Action.RESTART):
            log.info("command ignored while %s account=%s command=%s", self.slot.phase.value, self.account.id,
                     command.action.value)
            if command.action in (Action.KEYBOARD_LAYOUT, Action.NOTIFY):  # their callers expect an error
                command.refuse(f"the desktop is {self.slot.phase.value}")
            command.finish(f"nothing to do: the desktop is {self.slot.phase.value}")
        command.finish(f"{command.action.value} done")
        self.desktop_policy = RestartPolicy(self.context.config.restart)
        self._publish(Phase.QUEUED, "started by the organiser")

    async def _lifecycle(self) -> None:
        """Keep the desktop up; returns when it failed for good or an organiser stopped it."""
        while True:
            failure = await self._bring_up()
            if failure is None:
                outcome = await self._watch()
                if outcome.ending is Ending.STOP:
                    await self._stop_proxy()
                    await self._stop_desktop()
                    self._publish(Phase.STOPPED, "stopped by the organiser")
                    return
                if outcome.ending is Ending.RESTART:
                    await self._stop_desktop()
                    self._publish(Phase.STARTING, "restarted by the organiser")
                    continue
                failure = outcome.reason
            delay = self.desktop_policy.next_delay()
            log.warning("desktop down account=%s reason=%s", self.account.id, failure)
            self._persist(self.store.record_event, "desktop-down", self.account.id, failure)
            await self._stop_desktop()
            if delay is None:
                self._publish(Phase.FAILED, failure)
                log.error("desktop failed, giving up account=%s reason=%s", self.account.id, failure)
                return
            self.slot.restarts += 1
            self._publish(Phase.STARTING, f"restarting: {failure}")
            await asyncio.sleep(delay)

    async def _bring_up(self) -> str | None:
        """Start (unless adopted), prove readiness, start the proxy. None on success, else why not."""
        started = time.monotonic()
        fresh = self.state is None
        if self.state is None:
            async with self.context.start_limit:
                self._publish(Phase.STARTING, self.slot.reason)
                try:
                    self.state = await self.backend.start(self.account)
                except BackendError as exc:
                    return str(exc)
                except OSError as exc:
                    log.exception("desktop start failed account=%s", self.account.id)
                    return f"could not start: {exc}"
                self._persist(self.store.save_desktop, self.account.id, self.backend.name, self.state)
        state = self.state
        # Waiting in a scheduler's queue holds no start slot: others may start meanwhile.
        failure = await self._wait_running(state)
        if failure is None:
            async with self.context.start_limit:
                failure = await self._prove_ready(state)
        if failure is None:
            failure = await self._ensure_proxy()
        if failure is not None:
            return failure
        self.desktop_policy.record_healthy()
        self.slot.output_tail = ""
        if fresh:
            self.context.metrics.spawn_seconds.observe(time.monotonic() - started)
        # A backend's note (e.g. why an account got VNC instead of DCV) stays visible while ready.
        self._publish(Phase.READY, self.slot.detail.get("note", ""))
        return None

    async def _wait_running(self, state: DesktopState) -> str | None:
        """Poll until the desktop runs and its endpoint is known. Time in a queue is not limited."""
        timeout_s = self.context.config.desktop.start_timeout_s
        last: list[PollResult] = []

        async def settled() -> PollResult | None:
            result = await self.backend.poll(self.account, state)
            last[:] = [result]
            running = result.status is Status.RUNNING and result.endpoint is not None
            return result if running or result.status in (Status.GONE, Status.PENDING) else None

        while True:
            try:
                result = await poll_until(settled, timeout_s=timeout_s, what="the desktop running",
                                          backoff=STARTING_BACKOFF)
            except PollTimeout:
                return f"did not run within {timeout_s:g} s ({last[0].reason or last[0].status.value})"
            if result.status is Status.GONE:
                return self._gone(result, "the desktop exited while starting")
            if result.status is Status.PENDING:  # the deadline starts again once it leaves the queue
                self._publish(Phase.QUEUED, result.reason)
                await asyncio.sleep(PENDING_POLL_S)
                continue
            assert result.endpoint is not None  # settled() returns a running result only with one
            await self._set_endpoint(state, result.endpoint)
            return None

    def _gone(self, result: PollResult, default: str) -> str:
        """Why the desktop went; what it printed last is kept for organisers (status, admin page)."""
        if result.output_tail:
            self.slot.output_tail = result.output_tail
            self.context.changed.set()
        self.slot.ends_at = None
        return result.reason or default

    async def _set_endpoint(self, state: DesktopState, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.slot.endpoint = endpoint
        self.slot.detail = dict(self.backend.describe(state))
        self.slot.protocol = self.backend.protocol(state)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
            self.slot.endpoint_ip = str(infos[0][4][0])
        except OSError:
            self.slot.endpoint_ip = None
        if self.slot.phase is Phase.QUEUED:
            self._publish(Phase.STARTING)

    async def _prove_ready(self, state: DesktopState) -> str | None:
        """Ready means an RFB server answers with its banner at the desktop's endpoint; never a sleep."""
        endpoint = self.endpoint
        assert endpoint is not None  # _wait_running set it
        timeout_s = self.context.config.desktop.start_timeout_s
        last_error = ["no answer"]

        async def answered() -> bool | str:
            """True once ready; why not if the desktop went meanwhile; False to try again."""
            try:
                # An RFB handshake unless the backend knows better (a DCV web server answering).
                await self.backend.prove_ready(self.account, state, endpoint)
                return True
            except (OSError, TimeoutError, rfb.RfbError, BackendError) as exc:
                last_error[0] = str(exc) or type(exc).__name__
            result = await self.backend.poll(self.account, state)
            if result.status is Status.GONE:
                return self._gone(result, "the desktop exited while starting")
            return False

        try:
            outcome = await poll_until(answered, timeout_s=timeout_s, what="the desktop ready", backoff=READY_BACKOFF)
        except PollTimeout:
            what = "no RFB handshake" if self.slot.protocol == "vnc" else f"its {self.slot.protocol} server did not answer"
            return f"{what} within {timeout_s:g} s ({last_error[0]})"
        return None if outcome is True else str(outcome)

    async def _ensure_proxy(self) -> str | None:
        endpoint = self.endpoint
        assert endpoint is not None  # _wait_running set it
        if self.proxy is not None and self.proxy.alive and self.proxy.endpoint == endpoint:
            return None
        await self._stop_proxy()
        if self.slot.protocol != "vnc":
            # Not a VNC server: participants reach it through its own authenticated route (e.g.
            # /dcv/ACCOUNT/, gateway.web.dcv_proxy), never through the unauthenticated websocket proxy.
            self.proxy = RunningProxy(self.account.id, endpoint)
            return None
        try:
            self.proxy = await self.context.proxy_mode.start(self.account, endpoint)
        except Exception as exc:  # a proxy that won't start is this account's failure, not the gateway's
            return f"proxy did not start: {exc}"
        if self.proxy.identity is not None:
            self._persist(self.store.save_service, f"proxy:{self.account.id}", self.proxy.identity)
        return None

    async def _watch(self) -> WatchOutcome:
        """Watch desktop and proxy until the desktop is gone or an organiser stops or restarts it."""
        interval = self.context.config.desktop.poll_interval_s
        while True:
            state, proxy = self.state, self.proxy
            assert state is not None and proxy is not None  # _bring_up succeeded
            command, proxy_status = await self._next_event(proxy, interval)
            if command is not None:
                outcome = await self._carry_out(command, state)
                if outcome is not None:
                    return outcome
                continue
            if proxy_status is not None:
                failure = await self._restart_proxy(proxy_status)
                if failure is not None:
                    return WatchOutcome(Ending.FAILED, failure)
                continue
            result = await self.backend.poll(self.account, state)
            if result.status is Status.GONE:
                return WatchOutcome(Ending.FAILED, self._gone(result, "the desktop exited"))
            if result.status is Status.RUNNING:
                self.slot.ends_at = result.ends_at
            self._note_unknown(result.status, result.reason)
            await self._maintain(state)

    async def _carry_out(self, command: Command, state: DesktopState) -> WatchOutcome | None:
        """One request to the running desktop; an outcome if watching it ends here."""
        action = command.action
        if action in (Action.STOP, Action.RESTART):
            command.finish(f"{action.value} done")
            log.info("organiser request account=%s command=%s", self.account.id, action.value)
            return WatchOutcome(Ending.STOP if action is Action.STOP else Ending.RESTART)
        if action is Action.DISCONNECT:
            command.finish(f"{action.value} done")
            await self._stop_proxy()
            failure = await self._ensure_proxy()
            return None if failure is None else WatchOutcome(Ending.FAILED, failure)
        if action is Action.START:
            command.finish(f"{action.value} done")
            return None
        try:
            command.finish(await self._backend_request(command, state))
        except (BackendError, OSError, TimeoutError) as exc:  # the desktop carries on; the caller and the log hear why
            log.error("request failed account=%s action=%s error=%s", self.account.id, action.value,
                      str(exc) or type(exc).__name__)
            if action is Action.EXTEND:
                command.finish(f"not extended: {exc}")
            elif action is Action.REFRESH_PASSWORDS:
                command.finish(f"password file not rewritten: {exc}")
            else:
                command.refuse(str(exc) or type(exc).__name__)
        return None

    async def _backend_request(self, command: Command, state: DesktopState) -> str:
        """The requests that the backend carries out on the running desktop; their outcome in words."""
        action, payload = command.action, command.payload
        if action is Action.EXTEND:
            assert isinstance(payload, float)
            return await self.backend.extend(self.account, state, payload)
        if action is Action.REFRESH_PASSWORDS:
            await self.backend.refresh_passwords(self.account, state)
            return "password file rewritten"
        if action is Action.KEYBOARD_LAYOUT:
            assert isinstance(payload, str)
            await self.backend.set_keyboard_layout(self.account, state, payload)
            self.slot.keyboard_layout = payload
            self._persist(self.store.record_event, "keyboard-layout", self.account.id, payload)
            return f"keyboard layout {payload}"
        assert action is Action.NOTIFY and isinstance(payload, str)
        async with asyncio.timeout(NOTIFY_TIMEOUT_S):
            await self.backend.notify(self.account, state, payload)
        return "shown"

    async def _next_event(self, proxy: RunningProxy, interval: float) -> tuple[Command | None, int | None]:
        """Whichever comes first: a command, the proxy exiting (its status), or the poll interval (neither)."""
        command = asyncio.ensure_future(self.commands.get())
        proxy_exit = asyncio.ensure_future(proxy.wait())
        try:
            await asyncio.wait((command, proxy_exit), timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (command, proxy_exit):
                waiter.cancel()
            await asyncio.gather(command, proxy_exit, return_exceptions=True)
        # A command taken from the queue is never dropped, even if it arrived while cancelling.
        if command.done() and not command.cancelled():
            return command.result(), None
        if proxy_exit.done() and not proxy_exit.cancelled() and proxy_exit.exception() is None:
            return None, int(proxy_exit.result())
        return None, None

    def _note_unknown(self, status: Status, reason: str) -> None:
        """A desktop whose state can't be told for a while stays up, but organisers are told."""
        if status is not Status.UNKNOWN:
            if self.unknown_since is not None:
                self.unknown_since = None
                self._publish(Phase.READY)
            return
        now = time.monotonic()
        self.unknown_since = self.unknown_since or now
        if now - self.unknown_since >= UNKNOWN_REPORT_AFTER_S:
            seconds = int(now - self.unknown_since)
            self._publish(Phase.READY, f"cannot check this desktop for {seconds} s: {reason}")

    async def _restart_proxy(self, status: int) -> str | None:
        log.warning("proxy exited account=%s status=%d", self.account.id, status)
        self._persist(self.store.record_event, "proxy-down", self.account.id, f"status {status}")
        self.context.metrics.proxy_errors.labels(self.account.id).inc()
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

    async def _maintain(self, state: DesktopState) -> None:
        new_state = await self.backend.maintain(self.account, state)
        if new_state is not None:
            self.state = new_state
            self._persist(self.store.save_desktop, self.account.id, self.backend.name, new_state)

    async def _stop_proxy(self) -> None:
        if self.proxy is not None:
            await self.context.proxy_mode.stop(self.proxy)
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
