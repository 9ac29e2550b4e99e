"""Talking to Slurm: the one place where ``sbatch``, ``squeue``, ``scontrol``, ``sinfo``, ``scancel`` and
``srun`` are run, for :class:`~gateway.backends.slurm.SlurmBackend` and
:class:`~gateway.backends.dcv.DcvBackend` alike.

* Every command goes through :meth:`SlurmClient.command`, which retries the failures that mean
  "slurmctld is away" (restarting, unreachable, busy) with backoff, and nothing else.
* Job states come from one ``squeue`` snapshot shared by every account (:class:`JobQueue`); a job
  missing from it is asked about with ``scontrol show job``. Only Slurm saying that it does not know
  the job counts as "ended"; a failing command raises :class:`SlurmUnavailable` ("don't know").
* Parsing is left to the pure functions of :mod:`gateway.backends.slurm_parse`.
* Commands for a job's user run as that user (:func:`as_user`: ``runuser``/``sudo -n``, an argv
  prefix, never a shell string). Secrets reach a command only on stdin.

One client serves all the backends of a gateway that share a queue snapshot and a submit limit
(the DCV backend's two Slurm backends).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gateway.backends.base import BackendError
from gateway.backends.slurm_parse import (
    SINFO_NODE_FORMAT,
    SINFO_PARTITION_FORMAT,
    SQUEUE_FORMAT,
    TIMES_FORMAT,
    JobInfo,
    JobState,
    JobTimes,
    PartitionInfo,
    is_invalid_job_id,
    job_state,
    parse_job_id,
    parse_node_addresses,
    parse_scontrol_job,
    parse_scontrol_partitions,
    parse_sinfo_partitions,
    parse_squeue,
    split_times,
)
from gateway.common.polling import Backoff, PollTimeout, poll_until
from gateway.common.proc import CommandResult, CommandTimeout, last_line, run
from gateway.model.config import RestartConfig
from gateway.model.restart import RestartPolicy

__all__ = ["SlurmClient", "SlurmUnavailable", "JobQueue", "as_user", "why_failed", "is_transient",
           "QUEUE_TTL_S", "STOP_WAIT_S"]

log = logging.getLogger("gateway.slurm")

T = TypeVar("T")

#: How long one squeue snapshot serves every account's poll.
QUEUE_TTL_S = 1.0
#: How long cancel() waits for a cancelled job to leave the node.
STOP_WAIT_S = 45.0
#: How long one ``scontrol show partition`` serves (a partition's limits change rarely, and only by an admin).
PARTITION_TTL_S = 10.0
#: Attempts of a command whose failures are transient (slurmctld away), and their backoff.
ATTEMPTS = 5
_RETRY = dict(window_s=3600.0, backoff_initial_s=0.5, backoff_max_s=5.0)

# Failures worth retrying: slurmctld restarting, unreachable, or busy.
_TRANSIENT = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Connection refused",
    "Zero Bytes were transmitted",
    "Resource temporarily unavailable",
    "try again",
    "Transport endpoint",
    "slurm_persist_conn",
    "Communication connection failure",
    "Reservation request busy",
    "Job(s) active",
)


class SlurmUnavailable(Exception):
    """A Slurm command failed or timed out: the answer is "don't know"."""

    def __init__(self, what: str, why: str) -> None:
        self.why = why
        super().__init__(f"{what}: {why}" if what else why)


def why_failed(result: CommandResult) -> str:
    """What a failed command said (its last line of output), for messages."""
    return last_line(result.stderr or result.stdout) or f"status {result.returncode}"


def is_transient(result: CommandResult) -> bool:
    text = result.stderr.decode(errors="replace")
    return any(marker in text for marker in _TRANSIENT)


def as_user(user: str | None) -> list[str]:
    """The prefix that runs a Slurm command as ``user`` (argv, never a shell string); [] for ourselves."""
    if user is None or (os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name == user):
        return []
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--"]
    return ["sudo", "-n", "-u", user, "--"]


def step_argv(job_id: int | str, user: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the running job ``job_id``, as its user (an ``srun --overlap`` step)."""
    return as_user(user) + ["srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", "--quiet",
                            *argv]


class JobQueue:
    """One ``squeue`` snapshot of all jobs, shared by every account's poll for ``ttl_s``.

    Callers that arrive while a snapshot is being taken wait for it instead of starting another,
    so N watchers cost one squeue per second, not N. A failure is cached for the same time.
    """

    def __init__(self, *, timeout_s: float, ttl_s: float = QUEUE_TTL_S) -> None:
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.calls = 0
        self._lock = asyncio.Lock()
        self._taken_at: float | None = None
        self._jobs: dict[int, JobInfo] = {}
        self._times: dict[int, JobTimes] = {}
        self._error: str | None = None

    def times(self, job_id: int) -> JobTimes | None:
        """The job's expected start and end from the last snapshot (None: not in it)."""
        return self._times.get(job_id)

    def invalidate(self) -> None:
        self._taken_at = None

    async def jobs(self) -> dict[int, JobInfo]:
        """Every job slurmctld still lists (also those that ended less than MinJobAge ago)."""
        async with self._lock:
            if self._taken_at is None or time.monotonic() - self._taken_at >= self.ttl_s:
                await self._refresh()
            if self._error is not None:
                raise SlurmUnavailable("", self._error)
            return self._jobs

    async def _refresh(self) -> None:
        self.calls += 1
        # squeue --json ignores -j/-u/-t in 22.05; plain squeue lists everything and we filter here.
        # The same one command also gives every queued job's expected start (what squeue --start shows).
        argv = ["squeue", "--noheader", "--states=all", f"--format={TIMES_FORMAT}{SQUEUE_FORMAT}"]
        try:
            result = await run(argv, timeout_s=self.timeout_s)
            if not result.ok:
                raise SlurmUnavailable("squeue failed", why_failed(result))
            times, lines = split_times(result.stdout.decode(errors="replace"))
            self._jobs = parse_squeue(lines)
            self._times = times
            self._error = None
        except (SlurmUnavailable, CommandTimeout, ValueError, OSError) as exc:
            self._error = str(exc)
        self._taken_at = time.monotonic()


class SlurmClient:
    """Slurm's commands for the backends: submit, job states, cancel, nodes, partitions."""

    def __init__(self, *, timeout_s: float, submit_concurrency: int) -> None:
        self.timeout_s = timeout_s
        self.queue = JobQueue(timeout_s=timeout_s)
        #: At most this many sbatch at once: a burst of starts must not flood slurmctld.
        self.submit_limit = asyncio.Semaphore(submit_concurrency)
        self._node_addresses: dict[str, str] = {}
        self._node_addresses_at = 0.0
        self._node_lock = asyncio.Lock()
        self._partitions: dict[str | None, tuple[float, dict[str, str]]] = {}
        self._partition_lock = asyncio.Lock()

    async def command(self, what: str, argv: Sequence[str], *, input: bytes | None = None,
                      attempts: int = ATTEMPTS,
                      after_timeout: Callable[[], Awaitable[bytes | None]] | None = None) -> CommandResult:
        """Run a Slurm command; transient failures (slurmctld away) and timeouts are retried with backoff.

        Returns the last result (which may have failed for a lasting reason); raises
        :class:`SlurmUnavailable` when it kept failing transiently. ``after_timeout`` is asked after
        a timeout whether the command did its work all the same: the output it gives is taken as the
        command's (sbatch may have submitted the job before it timed out).
        """
        policy = RestartPolicy(RestartConfig(max_attempts=attempts, **_RETRY))
        while True:
            try:
                result = await run(argv, timeout_s=self.timeout_s, input=input)
            except CommandTimeout as exc:
                why = str(exc)
                done = await after_timeout() if after_timeout is not None else None
                if done is not None:
                    return CommandResult(tuple(argv), 0, done, b"", 0.0)
            else:
                if result.ok or not is_transient(result):
                    return result
                why = why_failed(result)
            delay = policy.next_delay()
            if delay is None:
                raise SlurmUnavailable(what, why)
            log.warning("slurm command failed, retrying what=%s in_s=%.1f reason=%s", what, delay, why)
            await asyncio.sleep(delay)

    # -- jobs ------------------------------------------------------------------------------------

    async def submit(self, argv: Sequence[str], script: bytes, *, job_name: str, user: str | None) -> int:
        """Submit ``script`` (on sbatch's stdin) with ``argv``; the job id. BackendError if Slurm refuses."""

        async def submitted_anyway() -> bytes | None:
            found = await self.find_live_job(job_name, user)
            return None if found is None else f"{found}\n".encode()

        async with self.submit_limit:
            try:
                result = await self.command("sbatch", argv, input=script, after_timeout=submitted_anyway)
            except SlurmUnavailable as exc:
                raise BackendError(f"sbatch kept failing: {exc.why}") from None
        if not result.ok:
            raise BackendError(f"sbatch refused the desktop job: {why_failed(result)}")
        try:
            job_id = parse_job_id(result.stdout.decode(errors="replace"))
        except ValueError as exc:
            raise BackendError(f"sbatch answered something unexpected: {exc}") from None
        self.queue.invalidate()
        return job_id

    async def find_live_job(self, name: str, user: str | None) -> int | None:
        """The newest pending or running job called ``name`` of ``user`` (None: the gateway's user)."""
        self.queue.invalidate()
        try:
            jobs = await self.queue.jobs()
        except SlurmUnavailable:
            return None
        wanted_user = user or pwd.getpwuid(os.geteuid()).pw_name
        for info in sorted(jobs.values(), key=lambda j: j.job_id, reverse=True):
            if info.name == name and info.user == wanted_user and info.state in (JobState.PENDING, JobState.RUNNING):
                return info.job_id
        return None

    async def job_status(self, job_id: int) -> tuple[JobState, JobInfo | None, str]:
        """The job's state from the shared snapshot, or from scontrol when the snapshot lacks it.

        Raises :class:`SlurmUnavailable` when Slurm cannot say. ``JobState.ENDED`` also stands for
        "Slurm no longer knows this job".
        """
        jobs = await self.queue.jobs()
        info = jobs.get(job_id)
        if info is not None:
            return info.state, info, info.raw_state
        # Not listed: submitted after the snapshot, or forgotten (MinJobAge). Ask about this one.
        try:
            result = await run(["scontrol", "show", "job", "-o", str(job_id)], timeout_s=self.timeout_s)
        except CommandTimeout as exc:
            raise SlurmUnavailable("", str(exc)) from None
        if not result.ok:
            if is_invalid_job_id(result.stderr.decode(errors="replace")):
                return JobState.ENDED, None, "no longer known to Slurm"
            raise SlurmUnavailable("scontrol show job failed", why_failed(result))
        try:
            fields = parse_scontrol_job(result.stdout.decode(errors="replace"))
        except ValueError as exc:
            raise SlurmUnavailable("", str(exc)) from None
        raw = fields.get("JobState", "")
        state = job_state(raw)
        nodes = fields.get("NodeList", "")
        info = JobInfo(job_id, state, "" if nodes == "(null)" else nodes, fields.get("Reason", ""),
                       fields.get("JobName", ""), fields.get("UserId", "").split("(")[0], raw)
        return state, info, raw

    async def cancel(self, job_id: int, user: str | None) -> None:
        """scancel the job (as its user) and wait up to STOP_WAIT_S until it has ended; BackendError if refused."""
        try:
            result = await self.command("scancel", as_user(user) + ["scancel", str(job_id)])
        except SlurmUnavailable as exc:
            raise BackendError(f"could not cancel job {job_id}: {exc}") from None
        if not result.ok and not is_invalid_job_id(result.stderr.decode(errors="replace")):
            raise BackendError(f"could not cancel job {job_id}: {why_failed(result)}")
        self.queue.invalidate()

        async def ended() -> bool:
            try:
                state, _, _ = await self.job_status(job_id)
            except SlurmUnavailable:
                return False
            return state is JobState.ENDED

        try:
            await poll_until(ended, timeout_s=STOP_WAIT_S, what=f"job {job_id} ending",
                             backoff=Backoff(first_s=0.5, factor=1.0, max_s=0.5))
        except PollTimeout:
            log.warning("desktop job still ending after %g s job=%d", STOP_WAIT_S, job_id)
            return
        log.info("desktop job ended job=%d", job_id)

    # -- nodes and partitions ----------------------------------------------------------------------

    async def node_address(self, node: str) -> str:
        """The address Slurm reaches ``node`` at (its NodeAddr), which the gateway uses too."""
        async with self._node_lock:
            if node not in self._node_addresses and time.monotonic() - self._node_addresses_at > 5:
                self._node_addresses_at = time.monotonic()
                try:
                    result = await run(["sinfo", "--noheader", "--Node", f"--format={SINFO_NODE_FORMAT}"],
                                       timeout_s=self.timeout_s)
                except (CommandTimeout, OSError):
                    result = None
                if result is not None and result.ok:
                    self._node_addresses.update(parse_node_addresses(result.stdout.decode(errors="replace")))
        return self._node_addresses.get(node, node)

    async def _shown(self, what: str, argv: list[str], parse: Callable[[str], T]) -> T:
        """``argv``'s output, parsed; SlurmUnavailable (naming ``what``) when it fails or can't be read."""
        result = await self.command(what, argv, attempts=2)
        if not result.ok:
            raise SlurmUnavailable(f"{what} failed", why_failed(result))
        try:
            return parse(result.stdout.decode(errors="replace"))
        except ValueError as exc:
            raise SlurmUnavailable(what, str(exc)) from None

    async def job_fields(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o ID`` as its fields; SlurmUnavailable when Slurm can't say."""
        return await self._shown("scontrol show job", ["scontrol", "show", "job", "-o", str(job_id)],
                                 parse_scontrol_job)

    async def partition_fields(self, name: str | None) -> dict[str, str]:
        """``scontrol show partition -o NAME`` as its fields (the default partition's for None), kept for
        PARTITION_TTL_S: `gateway extend` asks for each desktop at once. SlurmUnavailable when Slurm can't say."""
        async with self._partition_lock:
            taken_at, fields = self._partitions.get(name, (0.0, {}))
            if time.monotonic() - taken_at < PARTITION_TTL_S:
                return fields
            argv = ["scontrol", "show", "partition", "-o"] + ([name] if name else [])
            shown = await self._shown("scontrol show partition", argv, parse_scontrol_partitions)
            found = [f for f in shown if (f["PartitionName"] == name if name else f.get("Default") == "YES")]
            if not found:
                raise SlurmUnavailable("scontrol show partition", f"no partition {name or '(the default)'}")
            self._partitions[name] = (time.monotonic(), found[0])
            return found[0]

    async def partition(self, name: str) -> list[PartitionInfo]:
        """The rows ``sinfo`` shows for partition ``name`` (one per node state; [] if there is none).

        Raises :class:`SlurmUnavailable` when sinfo fails or its output can't be read.
        """
        argv = ["sinfo", "--noheader", f"--partition={name}", f"--format={SINFO_PARTITION_FORMAT}"]
        try:
            result = await run(argv, timeout_s=self.timeout_s)
        except (CommandTimeout, OSError) as exc:
            raise SlurmUnavailable("sinfo did not answer", str(exc)) from None
        if not result.ok:
            raise SlurmUnavailable("sinfo failed", why_failed(result))
        try:
            return parse_sinfo_partitions(result.stdout.decode(errors="replace"))
        except ValueError as exc:
            raise SlurmUnavailable("sinfo", str(exc)) from None
