"""What `gateway extend` asks of Slurm, for :class:`~gateway.backends.slurm.SlurmBackend`: a running job's
time limit, the limit of jobs submitted from now on, and the event reservation the gateway made.

A partition's MaxTime bounds a job's time limit, but Slurm 22.05 does not hold its administrator to it:
``scontrol update TimeLimit=`` by root or SlurmUser (who alone may raise a limit, so the gateway is one)
goes beyond MaxTime without a word, and a job submitted beyond it pends for good (reason
PartitionTimeLimit), whoever submits it. So the gateway checks MaxTime itself before it asks, and
refuses what would go beyond it with one line saying why and what fits. When Slurm can't say (a
command failed), nothing is refused here: Slurm decides alone, as before.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from gateway.backends.base import BackendError
from gateway.backends.slurm_client import SlurmClient, SlurmUnavailable, why_failed
from gateway.backends.slurm_job import slurm_duration
from gateway.backends.slurm_parse import parse_slurm_duration, parse_slurm_time

__all__ = ["TimeLimit", "job_time_limit", "partition_time_limit", "extend_reservation"]

log = logging.getLogger("gateway.slurm")


@dataclass(frozen=True, slots=True)
class TimeLimit:
    """A time limit and the most its partition allows per job (MaxTime), in seconds; None: no limit."""

    partition: str
    limit_s: float | None
    max_s: float | None

    def refusal(self, seconds: float) -> str | None:
        """Why the limit may not grow by ``seconds`` (beyond MaxTime, and what fits), or None if it may."""
        if self.limit_s is None or self.max_s is None or self.limit_s + seconds <= self.max_s:
            return None
        room_min = int((self.max_s - self.limit_s) // 60)
        fits = f"at most +{room_min} min fits" if room_min >= 1 else "it is at that limit already"
        return (f"partition {self.partition} allows at most {slurm_duration(self.max_s)} per job (MaxTime); "
                f"{slurm_duration(self.limit_s)} +{seconds / 60:g} min would be "
                f"{slurm_duration(self.limit_s + seconds)}, {fits}")

    @property
    def allowed(self) -> str:
        """The partition's MaxTime in words, for a message about a refusal by Slurm."""
        return f"partition {self.partition} allows at most " + (
            slurm_duration(self.max_s) if self.max_s is not None else "any time") + " per job"


async def _max_time(client: SlurmClient, partition: str | None) -> tuple[str, float | None]:
    fields = await client.partition_fields(partition)
    try:
        return fields["PartitionName"], parse_slurm_duration(fields.get("MaxTime", "UNLIMITED"))
    except ValueError as exc:
        raise SlurmUnavailable("scontrol show partition", str(exc)) from None


async def job_time_limit(client: SlurmClient, job_id: int) -> TimeLimit | None:
    """The job's TimeLimit and its partition's MaxTime; None when Slurm can't say."""
    try:
        fields = await client.job_fields(job_id)
        name, max_s = await _max_time(client, fields.get("Partition") or None)
        return TimeLimit(name, parse_slurm_duration(fields.get("TimeLimit", "UNLIMITED")), max_s)
    except (SlurmUnavailable, ValueError, OSError) as exc:
        log.warning("time limit of job %d unknown, Slurm decides alone: %s", job_id, exc)
        return None


async def partition_time_limit(client: SlurmClient, partition: str | None, limit_s: float) -> TimeLimit | None:
    """``limit_s`` (jobs the gateway submits to ``partition``; None: the default one) against its MaxTime;
    None when Slurm can't say."""
    try:
        name, max_s = await _max_time(client, partition)
    except (SlurmUnavailable, OSError) as exc:
        log.warning("MaxTime of partition %s unknown: %s", partition or "(default)", exc)
        return None
    return TimeLimit(name, limit_s, max_s)


async def extend_reservation(client: SlurmClient, name: str, seconds: float) -> str:
    """The reservation ends ``seconds`` later; the line saying so, or BackendError saying why not."""
    try:
        shown = await client.command("scontrol show reservation", ["scontrol", "show", "reservation", "-o", name])
        found = re.search(r"EndTime=(\S+)", shown.stdout.decode(errors="replace"))
        end = parse_slurm_time(found.group(1)) if found else None
        if end is None:
            raise BackendError(f"reservation {name} not extended: its end time is unknown ({why_failed(shown)})")
        new_end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end + seconds))
        result = await client.command("scontrol update reservation",
                                      ["scontrol", "update", f"ReservationName={name}", f"EndTime={new_end}"])
    except SlurmUnavailable as exc:
        raise BackendError(f"reservation {name} not extended: {exc}") from None
    if not result.ok:
        raise BackendError(f"Slurm refused to extend reservation {name}: {why_failed(result)}")
    log.info("event reservation extended name=%s end=%s", name, new_end)
    return f"reservation {name}: now ends {new_end}"
