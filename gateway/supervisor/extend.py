"""`gateway extend` and the admin page's Extend: the event and its running desktops get more time.

What an extension gives the event (the idle policy's event window, the limit of jobs submitted from
now on) lives in the gateway's memory; it is also saved in the state database (``event_state``), and
a restarted gateway takes it back (:meth:`EventExtension.restore`) before any desktop starts. What
Slurm keeps itself (a job's TimeLimit, the reservation's end) needs nothing of the kind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.backends.base import Backend, BackendError
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.supervisor.commands import DesktopCommands
from gateway.supervisor.idle import IdleWatcher

__all__ = ["EventExtension"]

log = logging.getLogger("gateway.extend")

#: The event window's entry in the state database's event_state (the backends' are "backend:NAME").
IDLE_STATE = "idle"


@dataclass(frozen=True, slots=True)
class EventExtension:
    """Extends what belongs to the whole event, then each running desktop through its own watcher."""

    backends: Mapping[str, Backend]
    slots: Mapping[str, DesktopSlot]
    commands: DesktopCommands
    idle: IdleWatcher
    store: StateStore

    async def __call__(self, seconds: float, accounts: list[str] | None, actor: str) -> list[str]:
        """First the event (the Slurm reservation the gateway made, the limit of jobs submitted from now
        on, the idle policy's event window), then each running desktop (a Slurm job's TimeLimit).
        Returns one line per thing done or refused; every line is written to the audit log.
        """
        wanted = list(self.slots) if accounts is None else accounts
        unknown = [a for a in wanted if a not in self.slots]
        if unknown:
            raise LookupError(f"no desktop {', '.join(unknown)}")
        lines: list[str] = []
        done: set[str] = set()  # a reservation that two backends share is extended once
        # Event-wide, not one desktop's: the gateway, not a watcher, asks the backend.
        for name, backend in self.backends.items():
            if not any(self.slots[a].backend == name for a in wanted):
                continue
            try:
                lines += await backend.extend_event(seconds, done)
            except BackendError as exc:
                lines.append(str(exc))
        lines += self._extend_window(seconds, None if accounts is None else wanted)
        self._save()
        results = await asyncio.gather(*(self.commands.extend(a, seconds) for a in wanted))
        lines += [f"{account}: {result}" for account, result in zip(wanted, results)]
        for line in lines:
            subject = line.split(":", 1)[0]
            self.store.record_event("extend", subject if subject in self.slots else None,
                                    f"by {actor}: +{seconds / 60:g} min: {line}")
        return lines

    def _extend_window(self, seconds: float, accounts: list[str] | None) -> list[str]:
        """The idle policy's event window (and the end warnings that follow it) ends later."""
        if self.idle.policy.window is None:
            return []
        end = self.idle.extend_window(seconds, accounts)
        return [f"event window (idle policy): now ends {end}" + ("" if accounts is None else f" for {', '.join(accounts)}")]

    def _save(self) -> None:
        """What the event holds now, for :meth:`restore` after a restart (saved even when a backend's part
        failed: its new-job limit was raised in memory all the same)."""
        states = {f"backend:{name}": backend.event_state() for name, backend in self.backends.items()}
        self.store.save_event_state({IDLE_STATE: self.idle.extension_state(), **states})

    def restore(self) -> list[str]:
        """At start, after the backends opened and before any desktop starts: what earlier extensions gave
        the event window and new jobs holds again. One line per thing taken back or not (log, audit log)."""
        saved = self.store.event_state()
        takers: dict[str, Callable[[Mapping[str, Any]], str | None]] = {IDLE_STATE: self.idle.restore_extension}
        takers.update({f"backend:{name}": backend.load_event_state for name, backend in self.backends.items()})
        lines = []
        for name, take_back in takers.items():
            try:
                line = take_back(saved[name]) if name in saved else None
            except (TypeError, ValueError, AttributeError) as exc:  # a record that can't be read: the config's times
                line = f"{name}: the extension saved before the restart is unreadable, not applied ({exc})"
            if line is not None:
                lines.append(line)
        for line in lines:
            log.info("extension after a restart: %s", line)
            self.store.record_event("extend", None, f"after a restart: {line}")
        return lines
