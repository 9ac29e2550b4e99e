"""Idle handling: desktops nobody uses are warned, then disconnected or stopped, as configured.

One task in the supervisor's task group checks every ready desktop each ``idle.check_interval_s``.
A desktop is idle once it had no viewer for ``after_minutes_without_viewers`` or no keyboard or
mouse input for ``after_minutes_without_input`` (whichever is configured and comes first; input is
only seen in proxy.mode builtin). ``warn_minutes_before`` that moment a message is shown inside
the desktop (by its watcher, Backend.notify); the action follows no earlier than that long after
the warning, and never while a viewer typed within the warning time. Inside the event window ``event_action``
applies (default: nothing), outside it ``action``. Warnings and actions are commands to the
desktop's watcher (gateway.supervisor.commands), like an organiser's, and every warning and action
is written to the audit log.

The same task warns inside each ready desktop before its end (``end_warnings_minutes``, default 15
and 5): the end of its Slurm job (its time limit, as the watcher's polls report it) or ``event_end``,
whichever comes first. `gateway extend` moves both (:meth:`IdleWatcher.extend_window`), and the
warnings then count down to the new end. The window's extension is kept in the state database and
taken back by a restarted gateway (gateway/supervisor/extend.py), as long as ``event_end`` is unchanged.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.model.config import IdleConfig, parse_moment
from gateway.common.netstat import established_by_remote
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase

__all__ = ["IdlePolicy", "IdleDecision", "IdleWatcher"]

log = logging.getLogger("gateway.idle")


class _Notifier(Protocol):
    async def __call__(self, account: str, text: str) -> None: ...


@dataclass(frozen=True, slots=True)
class IdleDecision:
    """When a desktop becomes idle (time.time()), and why in words."""

    deadline: float
    why: str


class IdlePolicy:
    """The pure part: given a slot and what is known about it, when is it idle, and what then."""

    def __init__(self, config: IdleConfig, *, input_known: bool) -> None:
        self.config = config
        self.input_known = input_known
        self.window: tuple[datetime.datetime, datetime.datetime] | None = None
        if config.event_start and config.event_end:
            self.window = (parse_moment(config.event_start), parse_moment(config.event_end))
        #: What `gateway extend` added to the window's end: for every account, and for some alone.
        self.extended_s = 0.0
        self.extended_for: dict[str, float] = {}

    def window_end(self, account: str | None = None) -> float | None:
        """The end of the event window (time.time()), extensions included; None without a window."""
        if self.window is None:
            return None
        extra = self.extended_for.get(account, self.extended_s) if account is not None else self.extended_s
        return self.window[1].timestamp() + extra

    @property
    def enabled(self) -> bool:
        c = self.config
        idle_possible = c.after_minutes_without_viewers is not None or (
            c.after_minutes_without_input is not None and self.input_known)
        return idle_possible and (c.action != "none" or (self.window is not None and c.event_action != "none"))

    @property
    def warn_s(self) -> float:
        return self.config.warn_minutes_before * 60.0

    def action_at(self, now: float, account: str | None = None) -> str:
        end = self.window_end(account)
        if self.window is not None and end is not None and self.window[0].timestamp() <= now < end:
            return self.config.event_action
        return self.config.action

    def decide(self, slot: DesktopSlot, *, no_viewers_since: float | None, active_since: float) -> IdleDecision | None:
        """When ``slot`` is idle, or None while it can't become idle (a viewer is connected and input
        is not watched). ``active_since``: the last moment known to be active (ready, last action)."""
        c = self.config
        candidates = []
        if c.after_minutes_without_viewers is not None and no_viewers_since is not None:
            since = max(no_viewers_since, active_since)
            minutes = c.after_minutes_without_viewers
            candidates.append(IdleDecision(since + minutes * 60.0, f"no viewer for {minutes:g} min"))
        if c.after_minutes_without_input is not None and self.input_known:
            since = max(slot.last_input_at or 0.0, active_since)
            minutes = c.after_minutes_without_input
            candidates.append(IdleDecision(since + minutes * 60.0, f"no input for {minutes:g} min"))
        return min(candidates, key=lambda d: d.deadline) if candidates else None

    def typing(self, slot: DesktopSlot, now: float) -> bool:
        """A viewer typed or moved the mouse within the warning time (or the last check)."""
        recent_s = max(self.warn_s, self.config.check_interval_s)
        return slot.last_input_at is not None and now - slot.last_input_at < recent_s


class IdleWatcher:
    """Checks the desktops every few seconds; one task for the whole gateway."""

    def __init__(
        self,
        config: IdleConfig,
        slots: Mapping[str, DesktopSlot],
        store: StateStore,
        *,
        act: Callable[[str, str], Awaitable[str]],
        notify: _Notifier,
        count_viewers: Callable[[DesktopSlot, Mapping[tuple[str, int], int]], int],
        input_known: bool,
    ) -> None:
        self.policy = IdlePolicy(config, input_known=input_known)
        self.slots = slots
        self.store = store
        self.act = act
        self.notify = notify
        self.count_viewers = count_viewers
        self._no_viewers_since: dict[str, float] = {}
        self._acted_at: dict[str, float] = {}
        self._warned_at: dict[str, float] = {}
        self._spared_at: dict[str, float] = {}
        #: Per account: the end last warned about, and the smallest warning (minutes) given for it.
        self._end_warned: dict[str, tuple[float, float]] = {}

    def extend_window(self, seconds: float, accounts: list[str] | None) -> str:
        """`gateway extend`: the event window ends ``seconds`` later (for ``accounts`` only, if given)."""
        p = self.policy
        if accounts is None:
            p.extended_s += seconds
            p.extended_for = {a: extra + seconds for a, extra in p.extended_for.items()}
        else:
            for account in accounts:
                p.extended_for[account] = p.extended_for.get(account, p.extended_s) + seconds
        end = p.window_end(accounts[0] if accounts else None)
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(end)) if end is not None else "?"

    def extension_state(self) -> dict[str, Any]:
        """What `gateway extend` added to the window, for the state database, with the configured end it
        was added to."""
        p = self.policy
        return {"event_end": p.config.event_end, "extended_s": p.extended_s, "extended_for": dict(p.extended_for)}

    def restore_extension(self, state: Mapping[str, Any]) -> str | None:
        """A restarted gateway's window ends where the last one's did; a line saying so, None if there was
        nothing to restore. Not when idle.event_end differs from the end that was extended: the organiser
        moved the end in the config, or this state dir now serves another event."""
        extended_s = float(state.get("extended_s") or 0.0)
        extended_for = {str(a): float(s) for a, s in dict(state.get("extended_for") or {}).items()}
        p = self.policy
        if p.window is None or (extended_s == 0 and not extended_for):
            return None
        if state.get("event_end") != p.config.event_end:
            return (f"event window (idle policy): the extension of the end {state.get('event_end')} is not applied "
                    f"again, idle.event_end is now {p.config.event_end}")
        p.extended_s, p.extended_for = extended_s, extended_for
        end = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.window_end()))
        alone = f" ({len(extended_for)} accounts extended alone)" if extended_for else ""
        return f"event window (idle policy): ends {end}, as extended before the restart{alone}"

    @property
    def end_warnings(self) -> list[float]:
        """Minutes before a desktop's end at which it is warned, largest first."""
        return sorted(self.policy.config.end_warnings_minutes, reverse=True)

    async def run(self) -> None:
        if not self.policy.enabled and not self.end_warnings:
            log.info("idle handling and end warnings off")
            return
        c = self.policy.config
        log.info("idle handling on viewers_min=%s input_min=%s warn_min=%g action=%s event_action=%s",
                 c.after_minutes_without_viewers, c.after_minutes_without_input, c.warn_minutes_before,
                 c.action, c.event_action)
        while True:
            await asyncio.sleep(c.check_interval_s)
            await self.check(time.time())

    async def check(self, now: float) -> None:
        connections = established_by_remote() if self.policy.enabled else {}
        for account, slot in self.slots.items():
            try:
                if self.policy.enabled:
                    await self._check_one(account, slot, now, connections)
                await self._check_end(account, slot, now)
            except Exception:  # one desktop's trouble must not end idle handling for all
                log.exception("idle check failed account=%s", account)

    def desktop_end(self, account: str, slot: DesktopSlot) -> float | None:
        """When the desktop ends: its job's time limit or the event window's end, whichever is first."""
        ends = [end for end in (slot.ends_at, self.policy.window_end(account)) if end is not None]
        return min(ends) if ends else None

    async def _check_end(self, account: str, slot: DesktopSlot, now: float) -> None:
        """Warn inside the desktop as its end comes closer: once per configured warning, per end."""
        end = self.desktop_end(account, slot) if slot.phase is Phase.READY else None
        if end is None or not self.end_warnings or now >= end:
            return
        due = [m for m in self.end_warnings if now >= end - m * 60.0]
        if not due:
            return
        warned_end, warned_minutes = self._end_warned.get(account, (None, None))
        smallest = due[-1]
        if warned_end is not None and abs(warned_end - end) < 1.0 and warned_minutes is not None \
                and warned_minutes <= smallest:
            return
        self._end_warned[account] = (end, smallest)
        left = _duration(end - now)
        at = time.strftime("%H:%M", time.localtime(end))
        what = "its time limit" if slot.ends_at is not None and abs(end - slot.ends_at) < 1.0 else "the end of the event"
        text = (f"This desktop ends in about {left} (at {at}, {what}).\n"
                "Save your work now; files in your home folder are kept for download.")
        log.info("end warning account=%s in=%s", account, left)
        self.store.record_event("end:warn", account, f"ends at {at} ({what}), in {left}")
        await self.notify(account, text)

    def _forget(self, account: str) -> None:
        for table in (self._no_viewers_since, self._warned_at, self._acted_at, self._spared_at):
            table.pop(account, None)

    async def _check_one(self, account: str, slot: DesktopSlot, now: float,
                         connections: Mapping[tuple[str, int], int]) -> None:
        if slot.phase is not Phase.READY or slot.ready_since is None:
            self._forget(account)
            return
        if self.count_viewers(slot, connections) > 0:
            self._no_viewers_since.pop(account, None)
        else:
            self._no_viewers_since.setdefault(account, now)
        active_since = max(slot.ready_since, self._acted_at.get(account, 0.0))
        decision = self.policy.decide(slot, no_viewers_since=self._no_viewers_since.get(account),
                                      active_since=active_since)
        action = self.policy.action_at(now)
        warn_s = self.policy.warn_s
        if decision is None or action == "none" or now < decision.deadline - warn_s:
            if account in self._warned_at and decision is not None and now < decision.deadline - warn_s:
                log.info("idle desktop in use again account=%s", account)
                self.store.record_event("idle:resumed", account, "in use again after the warning")
            self._warned_at.pop(account, None)
            return
        if self.policy.typing(slot, now):
            if account not in self._spared_at:
                self.store.record_event("idle:spared", account, f"{decision.why}, but a viewer is typing")
            self._spared_at[account] = now
            return
        self._spared_at.pop(account, None)
        warned_at = self._warned_at.get(account)
        if warned_at is None and warn_s > 0:
            self._warned_at[account] = now
            left = max(decision.deadline - now, warn_s)
            text = (f"This desktop looks unused ({decision.why}).\n"
                    f"It will be {'stopped' if action == 'stop' else 'disconnected'} in about "
                    f"{_duration(left)} unless someone uses it.")
            log.info("idle warning account=%s why=%s action=%s", account, decision.why, action)
            self.store.record_event("idle:warn", account, f"{decision.why}; {action} in {_duration(left)}")
            await self.notify(account, text)
            return
        if now < decision.deadline or (warned_at is not None and now < warned_at + warn_s):
            return
        result = await self.act(account, action)
        log.info("idle action account=%s action=%s why=%s", account, action, decision.why)
        self.store.record_event(f"idle:{action}", account, f"by the idle policy ({decision.why}): {result}")
        self._warned_at.pop(account, None)
        self._acted_at[account] = now
        self._no_viewers_since.pop(account, None)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"
