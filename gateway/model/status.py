"""What participants and organisers see about each desktop: the supervisor writes, pages read."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from gateway.model.tokens import Account

__all__ = ["Endpoint", "Phase", "DesktopSlot"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a desktop's VNC server listens, as seen from the gateway host."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Phase(enum.Enum):
    QUEUED = "queued"        # waiting for a start slot, or for the scheduler
    STARTING = "starting"    # launched, waiting for its RFB handshake
    READY = "ready"          # handshake succeeded and the proxy listens
    FAILED = "failed"        # gave up after repeated failures; `reason` says why
    STOPPED = "stopped"      # stopped on purpose


@dataclass(slots=True, eq=False)
class DesktopSlot:
    """The live record of one account's desktop.

    Mutated only by the supervisor's task for it, except ``viewers`` and ``last_input_at``, which
    the builtin relay keeps (other proxy modes cannot see viewers: they stay 0 and None). Those
    two are for organisers, never for :meth:`public`.
    """

    account: Account
    phase: Phase = Phase.QUEUED
    reason: str = ""
    endpoint: Endpoint | None = None
    backend: str = ""
    restarts: int = 0
    ready_since: float | None = None
    changed_at: float = field(default_factory=time.time)
    #: The protocol the participant gets ("vnc"; "dcv" on GPU nodes with NICE DCV).
    protocol: str = "vnc"
    #: The endpoint's IP address (endpoint.host may be a node name), for counting connections.
    endpoint_ip: str | None = None
    #: Backend facts worth showing to organisers, e.g. {"job_id": "123"}.
    detail: dict[str, str] = field(default_factory=dict)
    #: The desktop's keyboard layout as last set (config default, or the participant's choice).
    keyboard_layout: str = "us"
    #: Websocket viewers connected now (builtin proxy mode only).
    viewers: int = 0
    #: When a viewer last sent keyboard or mouse input (time.time(); builtin proxy mode only).
    last_input_at: float | None = None
    #: When the scheduler will end the desktop (a Slurm job's time limit; time.time()), if it has an end.
    ends_at: float | None = None
    #: The last lines a desktop printed when it ended before it was ready (organisers only, no passwords).
    output_tail: str = ""

    def set(self, phase: Phase, reason: str = "") -> None:
        self.phase = phase
        self.reason = reason
        self.changed_at = time.time()
        self.ready_since = time.time() if phase is Phase.READY else None

    def public(self) -> dict[str, object]:
        """What anyone may see: never the password, host or port."""
        return {"account": self.account.id, "state": self.phase.value, "reason": self.reason or None}
