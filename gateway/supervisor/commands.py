"""Requests for one desktop, as typed commands on its watcher's queue.

A desktop's backend is driven only by its :class:`~gateway.supervisor.watcher.AccountWatcher`.
Everyone else -- the admin page and the control socket (restart, stop, start, disconnect), the
participants' keyboard layout, the idle policy's notices, `gateway extend`, a share link that
expired -- puts a :class:`Command` on that watcher's queue and, for the awaited actions, waits for
its outcome. :class:`DesktopCommands` is that post office: it knows each watcher's queue and
nothing else of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.backends.base import BackendError
from gateway.model.actions import Action
from gateway.model.status import DesktopSlot, Phase

__all__ = ["Command", "DesktopCommands", "AWAITED_COMMAND_TIMEOUT_S", "NOTIFY_TIMEOUT_S"]

log = logging.getLogger("gateway")

#: How long a caller waits for an awaited command (a watcher may be in the middle of a slow poll).
AWAITED_COMMAND_TIMEOUT_S = 30.0
#: How long a notice inside a desktop may take; one that can't be shown never holds anything up.
NOTIFY_TIMEOUT_S = 15.0


@dataclass(slots=True)
class Command:
    """A request for one desktop's watcher, with its outcome (a line of text, or BackendError)."""

    action: Action
    payload: str | float | None = None
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self, outcome: str) -> None:
        if not self.done.done():
            self.done.set_result(outcome)

    def refuse(self, reason: str) -> None:
        """The watcher could not do it; an awaiting caller gets a BackendError saying why."""
        if not self.done.done():
            self.done.set_exception(BackendError(reason))
        # Nobody may be waiting (a caller that gave up): the exception is then not worth a warning.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())


class DesktopCommands:
    """Sends commands to the watchers' queues: the only way in to a running desktop."""

    def __init__(self, queues: Mapping[str, asyncio.Queue[Command]], slots: Mapping[str, DesktopSlot]) -> None:
        self.queues = queues
        self.slots = slots

    async def send(self, account_id: str, command: Command, *, timeout_s: float = AWAITED_COMMAND_TIMEOUT_S) -> str:
        """Queue ``command``; for an awaited action, wait (at most ``timeout_s``) for its outcome.

        LookupError for an account without a desktop; TimeoutError if its watcher did not answer.
        """
        queue = self.queues.get(account_id)
        if queue is None:
            raise LookupError(f"no desktop {account_id}")
        queue.put_nowait(command)
        log.info("request queued account=%s action=%s", account_id, command.action.value)
        if command.action.awaited:
            async with asyncio.timeout(timeout_s):
                return await command.done
        return f"{command.action.value} requested"

    async def act(self, account_id: str, action: str) -> str:
        """An action by name (the admin page, the control socket, the idle policy, share links)."""
        try:
            typed = Action(action)
        except ValueError:
            raise LookupError(f"no action {action}") from None
        if typed.awaited and typed is not Action.REFRESH_PASSWORDS:
            raise LookupError(f"no action {action}")  # those need a payload: see the methods below
        return await self.send(account_id, Command(typed))

    async def extend(self, account_id: str, seconds: float) -> str:
        """More time for one running desktop (a Slurm job's TimeLimit); one line saying what happened."""
        slot = self.slots[account_id]
        if slot.phase is not Phase.READY:
            return f"not extended: the desktop is {slot.phase.value}"
        try:
            return await self.send(account_id, Command(Action.EXTEND, seconds))
        except TimeoutError:
            return "not extended: its watcher did not answer in time"

    async def set_keyboard_layout(self, account_id: str, layout: str) -> None:
        """Apply a participant's keyboard layout to their running desktop (BackendError if it can't)."""
        slot = self.slots.get(account_id)
        if slot is None or slot.phase is not Phase.READY:
            raise BackendError("the desktop is not running")
        try:
            await self.send(account_id, Command(Action.KEYBOARD_LAYOUT, layout))
        except TimeoutError:
            raise BackendError("the desktop did not answer in time") from None

    async def notify(self, account_id: str, text: str) -> None:
        """Show ``text`` inside the account's running desktop; a notice that can't be shown is only logged."""
        try:
            await self.send(account_id, Command(Action.NOTIFY, text), timeout_s=NOTIFY_TIMEOUT_S)
        except LookupError:
            return
        except (BackendError, TimeoutError) as exc:  # a warning that can't be shown never stops idle handling
            log.warning("idle warning not shown account=%s error=%s", account_id, str(exc) or type(exc).__name__)
