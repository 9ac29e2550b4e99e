"""The contract every desktop backend (local, Slurm, SSH, DCV) fulfils.

A backend knows how to start one account's desktop, how to tell whether it still runs, and how to
stop it. Everything it needs to find the desktop again after a gateway restart is in a JSON-able
state dict that the supervisor saves in the state database after ``start`` and hands back to
``adopt``. Readiness is not the backend's call: the supervisor proves it with an RFB handshake
to the endpoint the backend reports (or the backend's own :meth:`Backend.prove_ready` where the
desktop is not VNC, e.g. a DCV web server).
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.model.status import Endpoint
from gateway.model.tokens import Account

__all__ = ["Backend", "Status", "Endpoint", "PollResult", "BackendError", "DesktopState"]


class Status(enum.Enum):
    #: Accepted but not running yet (a queued Slurm job).
    PENDING = "pending"
    RUNNING = "running"
    #: Positive evidence that it is gone (process exited, job ended). Only this clears state.
    GONE = "gone"
    #: Could not tell (a command failed or timed out). Never a reason to start a duplicate.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class PollResult:
    status: Status
    #: Known once the desktop runs (a Slurm job's node is known only then).
    endpoint: Endpoint | None = None
    #: Why, in words an organiser understands (shown on the landing page when it failed).
    reason: str = ""
    #: When the desktop will be ended by its scheduler (a Slurm job's time limit; time.time()), if known.
    ends_at: float | None = None
    #: For organisers only (never on participants' pages): the last lines a desktop that ended printed,
    #: passwords removed.
    output_tail: str = ""


#: A backend's own record of one desktop; must round-trip through JSON.
DesktopState = Mapping[str, Any]


#: Longest single readiness probe (an RFB handshake, an HTTP request).
READY_PROBE_TIMEOUT_S = 3.0


class BackendError(Exception):
    """Starting or stopping failed in a way worth showing to the organiser (the message says why)."""


class Backend(abc.ABC):
    #: Stored with each desktop's state, so adopt() goes to the backend that wrote it.
    name: str

    @abc.abstractmethod
    async def start(self, account: Account) -> DesktopState:
        """Start ``account``'s desktop and return its state once it is launched (not yet ready).

        Raises :class:`BackendError` when it cannot be started. Must not leave anything running
        when it raises or is cancelled.
        """

    @abc.abstractmethod
    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        """Say whether the desktop described by ``state`` runs. Called often; must be cheap."""

    @abc.abstractmethod
    async def stop(self, account: Account, state: DesktopState) -> None:
        """Stop the desktop and everything started with it. Safe to call when it is already gone."""

    async def adopt(self, account: Account, state: DesktopState) -> PollResult:
        """Check a desktop recorded by an earlier gateway; RUNNING means it is kept as it is.

        The default is :meth:`poll`; backends whose poll relies on in-memory handles override it.
        """
        return await self.poll(account, state)

    def describe(self, state: DesktopState) -> Mapping[str, str]:
        """Facts about the desktop worth showing to organisers (e.g. {"job_id": "42"})."""
        return {}

    async def maintain(self, account: Account, state: DesktopState) -> DesktopState | None:
        """Repair in place what needs no restart (a desktop's exited window manager, say).

        Called after each poll that found the desktop running. Returns the new state if it
        changed, else None. The default does nothing.
        """
        return None

    async def set_keyboard_layout(self, account: Account, state: DesktopState, layout: str) -> None:
        """Switch the running desktop's keyboard layout (an XKB layout name, already validated)."""
        raise BackendError(f"the {self.name} backend cannot change the keyboard layout of a running desktop")

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        """Show ``text`` to whoever looks at the running desktop (e.g. an idle warning).

        Best effort: never raises for a desktop that cannot show it. The default only logs.
        """
        logging.getLogger("gateway.backend").info(
            "notice not shown (the %s backend cannot show messages) account=%s", self.name, account.id)

    async def extend(self, account: Account, state: DesktopState, seconds: float) -> str:
        """Let the running desktop live ``seconds`` longer (`gateway extend`); returns what was done.

        Raises :class:`BackendError` saying why when the scheduler refuses. The default: the desktop
        has no end of its own (local, SSH: only the idle policy's event window, which the gateway extends).
        """
        return "no time limit of its own to raise"

    async def extend_event(self, seconds: float, done: set[str]) -> list[str]:
        """What the whole event holds beyond its desktops (a Slurm reservation) gets ``seconds`` more.

        Called once per backend and `gateway extend`, before the desktops; returns a line per thing
        extended. ``done`` names what another backend extended already (shared by all of them: a
        reservation is extended once), and this one adds what it extended.
        """
        return []

    def event_state(self) -> dict[str, Any]:
        """What the whole event holds here that a restarted gateway must know again (e.g. the time
        :meth:`extend_event` added for jobs submitted since), JSON-able; {} for nothing (the default).

        Saved in the state database after each `gateway extend`, and given to :meth:`load_event_state`
        by the next `gateway up`.
        """
        return {}

    def load_event_state(self, state: Mapping[str, Any]) -> str | None:
        """Take back what :meth:`event_state` returned before a restart; called after :meth:`open`,
        before any start. Returns a line saying what was taken back or why not (for the log); the
        default takes nothing back and returns None."""
        return None

    async def refresh_passwords(self, account: Account, state: DesktopState) -> None:
        """Rewrite the running desktop's password file with the account's current view-only password.

        The default cannot reach a running desktop's file: the new password applies from the next start.
        """
        logging.getLogger("gateway.backend").warning(
            "view-only password changes at the next start (the %s backend cannot rewrite it now) account=%s",
            self.name, account.id)

    def protocol(self, state: DesktopState) -> str:
        """The protocol the participant gets with this desktop: "vnc" (the default) or "dcv".

        Anything but "vnc" is reached through its own route, not through the VNC websocket proxy.
        """
        return "vnc"

    async def prove_ready(self, account: Account, state: DesktopState, endpoint: Endpoint) -> None:
        """Return once the desktop at ``endpoint`` serves participants; raise while it does not.

        The supervisor calls it repeatedly until its start deadline, and takes OSError, TimeoutError,
        :class:`gateway.common.rfb.RfbError` and :class:`BackendError` as "not yet". The default is an RFB
        handshake up to the server's security types (ready means a VNC server answers; never a sleep).
        """
        from gateway.common import rfb

        await rfb.probe(endpoint.host, endpoint.port, timeout_s=READY_PROBE_TIMEOUT_S)

    async def open(self, accounts: Sequence[Account]) -> None:
        """Prepare for these accounts before any start (create a reservation, open connections).

        Raises :class:`BackendError` if the backend cannot serve at all.
        """

    async def close(self, *, final: bool) -> None:
        """Release what :meth:`open` made. ``final`` is True when the event's desktops were all
        stopped (`gateway down`, SIGTERM), False when only this gateway process goes away."""
