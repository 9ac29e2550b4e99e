"""`gateway extend` and the admin page's Extend: the event and its running desktops get more time."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.backends.base import Backend, BackendError
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.supervisor.commands import DesktopCommands
from gateway.supervisor.idle import IdleWatcher

__all__ = ["EventExtension"]


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
