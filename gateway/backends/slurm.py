"""Desktops as Slurm batch jobs: one job per account, in an event reservation.

Each job runs Xvnc and the desktop session (in the desktop container unless the runtime is
``none``) from the job script ``templates/desktop-job.sh.j2``, and writes a small report (node,
port, display) into the account's directory under ``slurm.shared_dir``. With ``run_as: account``
(the default) each job is submitted as the OS user named like the account, so the desktop and all
it starts run with that uid; ``gateway up`` checks those users exist first (:func:`run_as_problems`).
The report lives in a directory that user owns, so it only says *that* Xvnc listens: the endpoint
is always Slurm's node for the job (its NodeAddr) and the account's configured port, and a report
naming anything else is logged and not used. Readiness is still the supervisor's RFB handshake.

How the password reaches the job (never argv, never the script): the gateway writes it to a 0600
file, owned by the job's user, in the account's directory of the shared dir, and the job feeds
that file to ``vncpasswd -f`` on stdin. Not stdin of sbatch: sbatch's stdin is the job script
itself, and the job starts later, on another machine, with no pipe back to the gateway; and a job
that Slurm requeues runs the script again and needs the secret again. The shared dir is needed
anyway for the report. ``stop`` deletes the secret.

State is ``{"job_id", "user", "workdir"}``. Status comes from one ``squeue`` snapshot per second
shared by every account (:class:`JobQueue`); a job missing from it is GONE only when ``scontrol
show job`` says it ended or that Slurm does not know it. A failing command is UNKNOWN, never GONE.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import re
import pwd
import secrets
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.model.config import Config, RestartConfig
from gateway.model.container import ContainerSpec, exec_argv
from gateway.backends.desktop_users import uid_min
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.common.proc import CommandResult, CommandTimeout, run
from gateway.common.render import render, shell_quote
from gateway.model.restart import RestartPolicy
from gateway.backends.slurm_parse import (
    SQUEUE_FORMAT,
    JobInfo,
    JobState,
    is_invalid_job_id,
    job_state,
    parse_job_id,
    parse_scontrol_job,
    parse_squeue,
)
from gateway.model.tokens import AUTO_HOST, Account
from gateway.model.viewonly import view_only_password, vncpasswd_input
from gateway.backends.base import Backend, BackendError, DesktopState, Endpoint, PollResult, Status
from gateway.backends.local import xvnc_argv

__all__ = ["SlurmBackend", "JobQueue", "render_job_script", "sbatch_argv", "RESERVATION_RECORD"]

log = logging.getLogger("gateway.slurm")

#: In the state dir: the reservation this gateway created (so only that one is ever deleted).
RESERVATION_RECORD = "slurm-reservation.json"
#: How long one squeue snapshot serves every account's poll.
QUEUE_TTL_S = 1.0
#: How long stop() waits for a cancelled job to leave the node.
STOP_WAIT_S = 45.0
#: Run inside the job (srun step) as its user: $1 the display, $2 the text. The X cookie is where the job
#: script put it (templates/desktop-job.sh.j2: XDG_RUNTIME_DIR under the job's TMPDIR, else /tmp).
_NOTICE_SCRIPT = r"""export PATH=/usr/local/bin:/usr/bin:/bin
for dir in "${TMPDIR:-/tmp}" /tmp; do
    XAUTHORITY="$dir/workshop-desktop-$(id -u)-$SLURM_JOB_ID/Xauthority"
    [ -r "$XAUTHORITY" ] && break
done
export XAUTHORITY DISPLAY=":$1"
exec xmessage -center -timeout 300 "$2"
"""
_PASSWORD_MARK = "\0password-file\0"
_XAUTHORITY_MARK = "\0xauthority\0"
_SCRIPT_VARIABLES = {_PASSWORD_MARK: '"$passwd_file"', _XAUTHORITY_MARK: '"$XAUTHORITY"'}

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


# -- pure pieces: the job script and the sbatch command line --------------------------------------


def _shell_line(argv: Sequence[str]) -> str:
    """``argv`` as one shell command line: each word quoted, the password and cookie files left to the script."""
    return " ".join(_SCRIPT_VARIABLES.get(word) or shell_quote(word) for word in argv)


def container_spec(config: Config) -> ContainerSpec:
    c = config.container
    return ContainerSpec(runtime=c.runtime, image=c.image, binds=tuple(c.binds))


def render_job_script(config: Config, account: Account, *, home: str, workdir: str, secret_file: str) -> str:
    """The batch script of ``account``'s desktop job. Every value is quoted; the password is not in it."""
    spec = container_spec(config)
    d = config.desktop
    xvnc = xvnc_argv(
        xvnc="Xvnc", displayfd=3, rfb_port=account.vnc_port, password_file=Path(_PASSWORD_MARK),
        geometry=d.geometry, depth=d.depth, desktop_name=account.id, max_cut_text=d.max_cut_text,
        interface=config.slurm.interface, xauthority=Path(_XAUTHORITY_MARK),
    )
    return render(
        "desktop-job.sh.j2",
        account=account.id,
        runtime=spec.runtime,
        home=home,
        workdir=workdir,
        secret_file=secret_file,
        port=account.vnc_port,
        keyboard_layout=d.keyboard_layout,
        vncpasswd_line=_shell_line(exec_argv(spec, ["vncpasswd"])),
        xvnc_line=_shell_line(exec_argv(spec, xvnc)),
        session_line=_shell_line(exec_argv(spec, list(d.session))),
    )


def slurm_duration(seconds: float) -> str:
    """Seconds as Slurm's ``D-HH:MM:SS``."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def job_home(config: Config, state_dir: Path, account_id: str) -> Path:
    """The HOME of an account's desktop jobs, where its files are (`gateway archive` packs it from there):
    the account user's home on the cluster file system (run_as: account), else its directory in the
    shared dir. KeyError when run_as is account and the user does not exist."""
    if config.slurm.run_as == "account":
        return Path(pwd.getpwnam(account_id).pw_dir)
    shared = Path(config.slurm.shared_dir) if config.slurm.shared_dir else state_dir / "slurm"
    return shared / account_id / "home"


def job_name(config: Config, account: Account) -> str:
    return f"{config.slurm.job_name_prefix}-{account.id}"


def sbatch_argv(config: Config, account: Account, *, reservation: str | None, workdir: str,
                extra_time_s: float = 0.0) -> list[str]:
    """``sbatch`` with every option as its own argument; the script goes on stdin.

    ``extra_time_s``: what `gateway extend` added to the event, given to jobs submitted since.
    """
    s = config.slurm
    argv = [
        "sbatch", "--parsable",
        f"--job-name={job_name(config, account)}",
        f"--time={slurm_duration(s.time_limit_s + extra_time_s)}",
        "--nodes=1", "--ntasks=1",
        f"--cpus-per-task={s.cpus_per_desktop}",
        f"--chdir={workdir}",
        f"--output={workdir}/job-%j.out",
        # The job sets its own environment; the gateway's must not leak into a participant's desktop.
        "--export=NONE",
    ]
    if s.mem_per_desktop:
        argv.append(f"--mem={s.mem_per_desktop}")
    if reservation:
        argv.append(f"--reservation={reservation}")
    if s.partition:
        argv.append(f"--partition={s.partition}")
    if s.account:
        argv.append(f"--account={s.account}")
    if s.qos:
        argv.append(f"--qos={s.qos}")
    if account.vnc_host != AUTO_HOST:
        argv.append(f"--nodelist={account.vnc_host}")  # a named host pins the desktop to that node
    argv += list(s.extra_sbatch_args)
    return argv


def parse_report(text: str) -> dict[str, str]:
    """The job's report: ``key=value`` lines (job, node, host, port, display)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def report_mismatch(report: Mapping[str, str], *, node: str, port: int) -> str | None:
    """Why a job's report disagrees with Slurm's node for the job or the account's port (None: it agrees).

    The report lives in a directory the participant's user owns: it may say anything, so it is only
    believed where it repeats what the gateway already knows.
    """
    reported_node, reported_port = report.get("node", ""), report.get("port", "")
    if reported_node != node:
        return f"it names node {reported_node[:64]!r}, but Slurm runs the job on {node!r}"
    if reported_port != str(port):
        return f"it names port {reported_port[:16]!r}, but the account's VNC port is {port}"
    return None


# -- talking to Slurm ----------------------------------------------------------------------------


class SlurmUnavailable(Exception):
    """A Slurm command failed or timed out: the answer is "don't know"."""


def _last_line(result: CommandResult) -> str:
    lines = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"status {result.returncode}"


def is_transient(result: CommandResult) -> bool:
    text = result.stderr.decode(errors="replace")
    return any(marker in text for marker in _TRANSIENT)


@dataclass(frozen=True, slots=True)
class JobTimes:
    """A job's start (expected, while it is pending) and end (its time limit), as time.time() values."""

    start: float | None
    end: float | None


#: Columns the snapshot asks for before SQUEUE_FORMAT: start (expected while pending, as squeue --start
#: shows it) and end time.
TIMES_FORMAT = "%S|%e|"


def parse_slurm_time(text: str) -> float | None:
    """A Slurm time such as 2026-11-23T09:00:00 (the cluster's local time); None for N/A, Unknown, ..."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?", text):
        return None
    return datetime.datetime.fromisoformat(text).timestamp()


def split_times(stdout: str) -> tuple[dict[int, JobTimes], str]:
    """Lines of ``squeue --format=%S|%e|`` + SQUEUE_FORMAT: each job's times, and the lines parse_squeue reads."""
    times: dict[int, JobTimes] = {}
    rest_lines = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        start, end, rest = (line.split("|", 2) + ["", ""])[:3]
        if start.strip().isdigit():  # no times in front (an squeue that ignored them): a plain line
            rest_lines.append(line)
            continue
        job_id = rest.split("|", 1)[0].strip()
        if job_id.isdigit():
            times[int(job_id)] = JobTimes(parse_slurm_time(start), parse_slurm_time(end))
        rest_lines.append(rest)
    return times, "\n".join(rest_lines)


def clock(moment: float, now: float | None = None) -> str:
    """A moment for participants: "14:05 (in 3 min)"."""
    now = time.time() if now is None else now
    left = moment - now
    when = time.strftime("%H:%M", time.localtime(moment))
    if left < 60:
        return f"{when} (in less than a minute)"
    if left < 5400:
        return f"{when} (in {round(left / 60)} min)"
    return f"{when} (in {left / 3600:.1f} h)"


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
                raise SlurmUnavailable(self._error)
            return self._jobs

    async def _refresh(self) -> None:
        self.calls += 1
        # squeue --json ignores -j/-u/-t in 22.05; plain squeue lists everything and we filter here.
        # The same one command also gives every queued job's expected start (what squeue --start shows).
        argv = ["squeue", "--noheader", "--states=all", f"--format={TIMES_FORMAT}{SQUEUE_FORMAT}"]
        try:
            result = await run(argv, timeout_s=self.timeout_s)
            if not result.ok:
                raise SlurmUnavailable(f"squeue failed: {_last_line(result)}")
            times, lines = split_times(result.stdout.decode(errors="replace"))
            self._jobs = parse_squeue(lines)
            self._times = times
            self._error = None
        except (SlurmUnavailable, CommandTimeout, ValueError, OSError) as exc:
            self._error = str(exc)
        self._taken_at = time.monotonic()


@dataclass(frozen=True, slots=True)
class SlurmDesktop:
    job_id: int
    user: str | None  # the OS user the job runs as with run_as: account, else None
    workdir: str

    def to_state(self) -> DesktopState:
        return {"job_id": self.job_id, "user": self.user, "workdir": self.workdir}

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> "SlurmDesktop":
        return cls(int(state["job_id"]), state.get("user") or None, str(state.get("workdir") or ""))  # type: ignore[arg-type]


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.settings = config.slurm
        self.state_dir = state_dir
        self.shared_dir = Path(self.settings.shared_dir) if self.settings.shared_dir else state_dir / "slurm"
        self.queue = JobQueue(timeout_s=self.settings.command_timeout_s)
        self.submit_limit = asyncio.Semaphore(self.settings.submit_concurrency)
        self.reservation: str | None = self.settings.reservation
        self._node_addresses: dict[str, str] = {}
        self._node_addresses_at = 0.0
        self._node_lock = asyncio.Lock()
        #: The job whose report was last refused, by account (logged once per job).
        self._refused_reports: dict[str, int] = {}
        #: What `gateway extend` added to the event: jobs submitted since get it on top of time_limit_s.
        self.extra_time_s = 0.0
        #: Notices shown in desktops (srun steps running xmessage); each ends by itself.
        self._notices: list[asyncio.subprocess.Process] = []

    # -- commands ------------------------------------------------------------------------------

    def _as_user(self, user: str | None) -> list[str]:
        """The prefix that runs a Slurm command as ``user`` (argv, never a shell string)."""
        if user is None or (os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name == user):
            return []
        if os.geteuid() == 0:
            return ["runuser", "-u", user, "--"]
        return ["sudo", "-n", "-u", user, "--"]

    async def _command(self, what: str, argv: Sequence[str], *, input: bytes | None = None,
                       attempts: int = 5) -> CommandResult:
        """Run a Slurm command; transient failures (slurmctld away) are retried with backoff.

        Returns the last result (which may have failed for a lasting reason); raises
        :class:`SlurmUnavailable` when it kept failing transiently.
        """
        policy = RestartPolicy(RestartConfig(max_attempts=attempts, window_s=3600.0,
                                             backoff_initial_s=0.5, backoff_max_s=5.0))
        while True:
            try:
                result = await run(argv, timeout_s=self.settings.command_timeout_s, input=input)
            except CommandTimeout as exc:
                why = str(exc)
            else:
                if result.ok or not is_transient(result):
                    return result
                why = _last_line(result)
            delay = policy.next_delay()
            if delay is None:
                raise SlurmUnavailable(f"{what}: {why}")
            log.warning("slurm command failed, retrying what=%s in_s=%.1f reason=%s", what, delay, why)
            await asyncio.sleep(delay)

    # -- open / close: the reservation ---------------------------------------------------------

    @property
    def _record_path(self) -> Path:
        return self.state_dir / RESERVATION_RECORD

    @staticmethod
    def has_leftovers(state_dir: Path) -> bool:
        """Whether a gateway that crashed left a reservation it created."""
        return (state_dir / RESERVATION_RECORD).exists()

    def _users(self, accounts: Sequence[Account]) -> list[str]:
        gateway_user = pwd.getpwuid(os.geteuid()).pw_name
        users = [gateway_user]
        if self.settings.run_as == "account":
            users += [a.id for a in accounts if a.id != gateway_user]
        return users

    async def open(self, accounts: Sequence[Account]) -> None:
        if self.settings.run_as == "account":
            if self.settings.shared_dir is None:
                raise BackendError("run_as: account needs slurm.shared_dir (a directory every node and every "
                                   "participant's user can reach; the state dir is private)")
            missing = [a.id for a in accounts if not _user_exists(a.id)]
            if missing:
                raise BackendError(f"run_as: account, but these accounts are not OS users here: {', '.join(missing)}")
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        # Traversable (not listable) when participants' users need their own subdirectory.
        os.chmod(self.shared_dir, 0o711 if self.settings.run_as == "account" else 0o700)
        if self.settings.reservation is not None:
            result = await self._command("scontrol show reservation",
                                         ["scontrol", "show", "reservation", "-o", self.settings.reservation])
            if not result.ok or f"ReservationName={self.settings.reservation} " not in result.stdout.decode():
                raise BackendError(f"reservation {self.settings.reservation} does not exist: {_last_line(result)}")
            self.reservation = self.settings.reservation
            return
        self.reservation = await self._ensure_own_reservation(accounts)

    async def _ensure_own_reservation(self, accounts: Sequence[Account]) -> str:
        recorded = self._read_record()
        if recorded is not None and await self._reservation_exists(recorded):
            log.info("reusing the event reservation this gateway created name=%s", recorded)
            return recorded
        name = f"{self.settings.job_name_prefix}-event-{secrets.token_hex(4)}"
        s = self.settings
        argv = ["scontrol", "create", "reservation", f"ReservationName={name}",
                f"StartTime={s.event_start}", f"Duration={max(1, round(s.event_duration_s / 60))}",
                f"Users={','.join(self._users(accounts))}",
                # Running jobs on the nodes don't block creating it; they just keep their cores.
                "Flags=IGNORE_JOBS"]
        argv.append(f"Nodes={s.reservation_nodes}" if s.reservation_nodes else f"NodeCnt={s.node_count}")
        if s.partition:
            argv.append(f"PartitionName={s.partition}")
        # Recorded before it exists: a crash right after creating it must not leave it unknown.
        atomic_write(self._record_path, json.dumps({"name": name, "created_at": time.time()}) + "\n", mode=0o600)
        try:
            result = await self._command("scontrol create reservation", argv)
        except SlurmUnavailable as exc:
            self._record_path.unlink(missing_ok=True)
            raise BackendError(f"cannot create the event reservation: {exc}") from None
        if not result.ok:
            self._record_path.unlink(missing_ok=True)
            raise BackendError(f"cannot create the event reservation: {_last_line(result)}")
        log.info("event reservation created name=%s", name)
        return name

    def _read_record(self) -> str | None:
        try:
            data = json.loads(self._record_path.read_text())
            return str(data["name"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _reservation_exists(self, name: str) -> bool:
        result = await self._command("scontrol show reservation", ["scontrol", "show", "reservation", "-o", name])
        return result.ok and f"ReservationName={name} " in result.stdout.decode()

    async def close(self, *, final: bool) -> None:
        if not final:
            return
        name = self._read_record()
        if name is None:
            return
        if await self._reservation_exists(name):
            try:
                result = await self._command("scontrol delete reservation",
                                             ["scontrol", "delete", "reservation", name], attempts=8)
            except SlurmUnavailable as exc:
                log.error("event reservation not deleted name=%s reason=%s", name, exc)
                return
            if not result.ok:
                log.error("event reservation not deleted name=%s reason=%s", name, _last_line(result))
                return
            log.info("event reservation deleted name=%s", name)
        self._record_path.unlink(missing_ok=True)

    # -- start ---------------------------------------------------------------------------------

    def _paths(self, account: Account) -> tuple[Path, Path, str]:
        """The account's work directory, its secret file, and the desktop's HOME."""
        workdir = self.shared_dir / account.id
        return workdir, workdir / ".vnc-secret", str(job_home(self.config, self.state_dir, account.id))

    async def start(self, account: Account) -> DesktopState:
        user = account.id if self.settings.run_as == "account" else None
        workdir, secret_file, home = self._paths(account)
        owner = pwd.getpwnam(user) if user else None
        try:
            _private_dir(workdir, owner)
            # Two lines: the full password, then the view-only one for instructors.
            _write_secret(secret_file, vncpasswd_input(account.password, view_only_password(self.state_dir, account.id)),
                          owner)
        except OSError as exc:
            raise BackendError(f"cannot prepare {workdir}: {exc.strerror or exc}") from None
        script = render_job_script(self.config, account, home=home, workdir=str(workdir),
                                   secret_file=str(secret_file))
        argv = self._as_user(user) + sbatch_argv(self.config, account, reservation=self.reservation,
                                                 workdir=str(workdir), extra_time_s=self.extra_time_s)
        async with self.submit_limit:
            job_id = await self._submit(account, argv, script.encode(), user)
        self.queue.invalidate()
        log.info("desktop job submitted account=%s job=%d reservation=%s", account.id, job_id, self.reservation)
        return SlurmDesktop(job_id, user, str(workdir)).to_state()

    async def _submit(self, account: Account, argv: list[str], script: bytes, user: str | None) -> int:
        policy = RestartPolicy(RestartConfig(max_attempts=5, window_s=3600.0, backoff_initial_s=0.5,
                                             backoff_max_s=5.0))
        while True:
            try:
                result = await run(argv, timeout_s=self.settings.command_timeout_s, input=script)
            except CommandTimeout as exc:
                # sbatch may have submitted before it timed out: look before submitting again.
                why = str(exc)
                found = await self._find_live_job(job_name(self.config, account), user)
                if found is not None:
                    return found
            else:
                if result.ok:
                    try:
                        return parse_job_id(result.stdout.decode(errors="replace"))
                    except ValueError as exc:
                        raise BackendError(f"sbatch answered something unexpected: {exc}") from None
                why = _last_line(result)
                if not is_transient(result):
                    raise BackendError(f"sbatch refused the desktop job: {why}")
            delay = policy.next_delay()
            if delay is None:
                raise BackendError(f"sbatch kept failing: {why}")
            log.warning("sbatch failed, retrying account=%s in_s=%.1f reason=%s", account.id, delay, why)
            await asyncio.sleep(delay)

    async def _find_live_job(self, name: str, user: str | None) -> int | None:
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

    # -- poll ----------------------------------------------------------------------------------

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
            result = await run(["scontrol", "show", "job", "-o", str(job_id)], timeout_s=self.settings.command_timeout_s)
        except CommandTimeout as exc:
            raise SlurmUnavailable(str(exc)) from None
        if not result.ok:
            if is_invalid_job_id(result.stderr.decode(errors="replace")):
                return JobState.ENDED, None, "no longer known to Slurm"
            raise SlurmUnavailable(f"scontrol show job failed: {_last_line(result)}")
        try:
            fields = parse_scontrol_job(result.stdout.decode(errors="replace"))
        except ValueError as exc:
            raise SlurmUnavailable(str(exc)) from None
        raw = fields.get("JobState", "")
        state = job_state(raw)
        nodes = fields.get("NodeList", "")
        info = JobInfo(job_id, state, "" if nodes == "(null)" else nodes, fields.get("Reason", ""),
                       fields.get("JobName", ""), fields.get("UserId", "").split("(")[0], raw)
        return state, info, raw

    def describe(self, state: DesktopState) -> dict[str, str]:
        return {"job_id": str(state["job_id"])} if "job_id" in state else {}

    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        desktop = SlurmDesktop.from_state(state)
        try:
            job_state_, info, raw = await self.job_status(desktop.job_id)
        except SlurmUnavailable as exc:
            return PollResult(Status.UNKNOWN, reason=f"Slurm does not answer: {exc}")
        times = self.queue.times(desktop.job_id)
        if job_state_ is JobState.PENDING:
            why = info.reason if info is not None and info.reason not in ("", "None") else "waiting"
            reason = f"job {desktop.job_id} queued ({why})"
            if times is not None and times.start is not None and times.start > time.time():
                reason += f"; expected to start at {clock(times.start)}"
            return PollResult(Status.PENDING, reason=reason)
        if job_state_ in (JobState.ENDED, JobState.COMPLETING):
            return PollResult(Status.GONE, reason=f"job {desktop.job_id} ended ({raw})",
                              output_tail=self._output_tail(account, desktop))
        if job_state_ is JobState.UNKNOWN:
            return PollResult(Status.UNKNOWN, reason=f"job {desktop.job_id} is in state {raw}")
        # Where the desktop is comes from Slurm (the job's node) and the token file (the port); the
        # report, which the participant's user can write, only says that Xvnc listens, and must agree.
        node = info.nodes if info is not None else ""
        port = self.config.dcv.port if state.get("protocol") == "dcv" else account.vnc_port
        report = self._read_report(desktop)
        if report is None or not node:
            return PollResult(Status.RUNNING, None,
                              f"job {desktop.job_id} runs on {node or '?'}; its desktop is starting")
        mismatch = report_mismatch(report, node=node, port=port)
        if mismatch is not None:
            if self._refused_reports.get(account.id) != desktop.job_id:
                self._refused_reports[account.id] = desktop.job_id
                log.warning("job report refused account=%s job=%d reason=%s", account.id, desktop.job_id, mismatch)
            return PollResult(Status.RUNNING, None, f"job {desktop.job_id}: its report was refused ({mismatch})")
        host = await self._node_address(node)
        return PollResult(Status.RUNNING, Endpoint(host, port), ends_at=times.end if times is not None else None)

    def _output_tail(self, account: Account, desktop: SlurmDesktop, lines: int = 6) -> str:
        """The last lines of the job's output file, for organisers; lines holding a password are left out."""
        path = Path(desktop.workdir) / f"job-{desktop.job_id}.out"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return ""
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - 8192))
            text = handle.read(8192).decode(errors="replace")
        secrets_ = [account.password, view_only_password(self.state_dir, account.id)]
        kept = [re.sub(r"[\x00-\x1f\x7f]", " ", line).strip()[:240] for line in text.splitlines()]
        kept = [line for line in kept if line and not any(secret and secret in line for secret in secrets_)]
        return " | ".join(kept[-lines:])

    def _read_report(self, desktop: SlurmDesktop) -> dict[str, str] | None:
        """The job's report, if it is a regular file (never a link, pipe or directory) about this job."""
        path = Path(desktop.workdir) / f"report-{desktop.job_id}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        with os.fdopen(fd, "rb") as handle:
            report = parse_report(handle.read(4096).decode(errors="replace"))
        return report if report.get("job") == str(desktop.job_id) else None

    async def _node_address(self, node: str) -> str:
        """The address Slurm reaches ``node`` at (its NodeAddr), which the gateway uses too."""
        async with self._node_lock:
            if node not in self._node_addresses and time.monotonic() - self._node_addresses_at > 5:
                await self._load_node_addresses()
        return self._node_addresses.get(node, node)

    async def _load_node_addresses(self) -> None:
        self._node_addresses_at = time.monotonic()
        with contextlib.suppress(CommandTimeout, OSError):
            result = await run(["sinfo", "--noheader", "--Node", "--format=%N|%o"],
                               timeout_s=self.settings.command_timeout_s)
            if result.ok:
                for line in result.stdout.decode(errors="replace").splitlines():
                    name, sep, address = line.strip().partition("|")
                    if sep and name and address:
                        self._node_addresses[name] = address

    # -- extend, notices -------------------------------------------------------------------------

    async def extend(self, account: Account, state: DesktopState, seconds: float) -> str:
        """Raise the running job's time limit (scontrol update TimeLimit=+MINUTES; needs Slurm admin rights)."""
        desktop = SlurmDesktop.from_state(state)
        minutes = max(1, math.ceil(seconds / 60))
        try:
            result = await self._command("scontrol update", ["scontrol", "update", f"JobId={desktop.job_id}",
                                                             f"TimeLimit=+{minutes}"])
        except SlurmUnavailable as exc:
            raise BackendError(f"job {desktop.job_id} not extended: {exc}") from None
        if not result.ok:
            limit = await self._partition_max_time()
            allowed = f" (partition {limit[0]} allows at most {limit[1]} per job)" if limit else ""
            raise BackendError(f"Slurm refused to extend job {desktop.job_id} by {minutes} min: "
                               f"{_last_line(result)}{allowed}")
        self.queue.invalidate()
        log.info("desktop job extended account=%s job=%d minutes=%d", account.id, desktop.job_id, minutes)
        return f"job {desktop.job_id}: time limit +{minutes} min"

    async def _partition_max_time(self) -> tuple[str, str] | None:
        partition = self.settings.partition
        argv = ["scontrol", "show", "partition", "-o"] + ([partition] if partition else [])
        with contextlib.suppress(SlurmUnavailable):
            result = await self._command("scontrol show partition", argv, attempts=1)
            for line in result.stdout.decode(errors="replace").splitlines():
                name, limit = re.search(r"PartitionName=(\S+)", line), re.search(r"MaxTime=(\S+)", line)
                if name and limit and (partition or "Default=YES" in line):
                    return name.group(1), limit.group(1)
        return None

    async def extend_event(self, seconds: float, done: set[str]) -> list[str]:
        """Jobs submitted from now on get ``seconds`` more, and the reservation the gateway made ends later."""
        self.extra_time_s += seconds
        lines = [f"new desktop jobs: time limit {slurm_duration(self.settings.time_limit_s + self.extra_time_s)}"]
        name = self._read_record()
        if f"reservation:{name or self.reservation}" in done:
            return lines
        done.add(f"reservation:{name or self.reservation}")
        if name is None:
            if self.reservation:
                lines.append(f"reservation {self.reservation} is not the gateway's: extend it yourself if needed "
                             f"(scontrol update ReservationName={self.reservation} EndTime=...)")
            return lines
        try:
            shown = await self._command("scontrol show reservation", ["scontrol", "show", "reservation", "-o", name])
            found = re.search(r"EndTime=(\S+)", shown.stdout.decode(errors="replace"))
            end = parse_slurm_time(found.group(1)) if found else None
            if end is None:
                raise BackendError(f"reservation {name} not extended: its end time is unknown ({_last_line(shown)})")
            new_end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end + seconds))
            result = await self._command("scontrol update reservation",
                                         ["scontrol", "update", f"ReservationName={name}", f"EndTime={new_end}"])
        except SlurmUnavailable as exc:
            raise BackendError(f"reservation {name} not extended: {exc}") from None
        if not result.ok:
            raise BackendError(f"Slurm refused to extend reservation {name}: {_last_line(result)}")
        log.info("event reservation extended name=%s end=%s", name, new_end)
        lines.append(f"reservation {name}: now ends {new_end}")
        return lines

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        """A message window in the job's desktop: xmessage run inside the job (srun --overlap), as its user."""
        desktop = SlurmDesktop.from_state(state)
        report = self._read_report(desktop)
        display = (report or {}).get("display", "")
        if not display.isdigit():
            log.warning("notice not shown, the job reported no display account=%s job=%d", account.id, desktop.job_id)
            return
        self._notices = [proc for proc in self._notices if proc.returncode is None]
        inner = exec_argv(container_spec(self.config), ["/bin/sh", "-c", _NOTICE_SCRIPT, "notice", display, text])
        argv = self._as_user(desktop.user) + ["srun", f"--jobid={desktop.job_id}", "--overlap", "--nodes=1",
                                              "--ntasks=1", "--quiet", *inner]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("notice not shown account=%s error=%s", account.id, exc)
            return
        self._notices.append(proc)
        log.info("notice shown account=%s job=%d display=:%s", account.id, desktop.job_id, display)

    # -- stop ----------------------------------------------------------------------------------

    async def stop(self, account: Account, state: DesktopState) -> None:
        desktop = SlurmDesktop.from_state(state)
        try:
            await self._cancel(desktop)
        finally:
            if desktop.workdir:
                workdir = Path(desktop.workdir)
                (workdir / ".vnc-secret").unlink(missing_ok=True)
                (workdir / f"report-{desktop.job_id}").unlink(missing_ok=True)

    async def _cancel(self, desktop: SlurmDesktop) -> None:
        argv = self._as_user(desktop.user) + ["scancel", str(desktop.job_id)]
        try:
            result = await self._command("scancel", argv)
        except SlurmUnavailable as exc:
            raise BackendError(f"could not cancel job {desktop.job_id}: {exc}") from None
        if not result.ok and not is_invalid_job_id(result.stderr.decode(errors="replace")):
            raise BackendError(f"could not cancel job {desktop.job_id}: {_last_line(result)}")
        self.queue.invalidate()
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(SlurmUnavailable):
                state, _, _ = await self.job_status(desktop.job_id)
                if state is JobState.ENDED:
                    log.info("desktop job ended job=%d", desktop.job_id)
                    return
            await asyncio.sleep(0.5)
        log.warning("desktop job still ending after %g s job=%d", STOP_WAIT_S, desktop.job_id)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def run_as_problems(config: Config, accounts: Sequence[Account], tokens_path: str) -> list[str]:
    """Why Slurm jobs can't run as their accounts' users (one line each); [] when they can.

    Checked by ``gateway up`` before anything starts. With ``run_as: account`` every Slurm account
    must be a user here (pwd/NSS, as getent sees it) with a uid of a normal user, and the jobs need
    a shared directory those users can reach.
    """
    if config.slurm.run_as != "account" or not accounts:
        return []
    problems = []
    if config.slurm.shared_dir is None:
        problems.append("slurm.shared_dir: slurm.run_as is account (the default), which needs a directory that the "
                        "gateway, every node and every account's user reach at the same path; set slurm.shared_dir")
    lowest = uid_min()
    missing = [a for a in accounts if not _user_exists(a.id)]
    unfit = [a for a in accounts if a not in missing and pwd.getpwnam(a.id).pw_uid < lowest]
    if missing:
        problems.append(
            f"{tokens_path}:{missing[0].line}: slurm.run_as is account (the default), but these accounts are not "
            f"users here: {', '.join(a.id for a in missing)}; create them (cluster accounts, or useradd NAME) or set "
            "slurm.run_as: gateway (every job as the gateway's user, which can read every password: never with "
            "participants you don't know)")
    if unfit:
        problems.append(
            f"{tokens_path}:{unfit[0].line}: these accounts are system users (uid below {lowest}), never used for a "
            f"participant's job: {', '.join(a.id for a in unfit)}")
    return problems


def _private_dir(path: Path, owner: pwd.struct_passwd | None) -> None:
    """Create ``path`` (0700), owned by ``owner`` if given; refuse a symlink planted in its place."""
    if owner is None:
        ensure_private_dir(path)
        return
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        raise OSError(f"{path} is not a directory")
    if info.st_uid != owner.pw_uid or info.st_gid != owner.pw_gid:
        os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    os.chmod(path, 0o700)


def _write_secret(path: Path, data: bytes, owner: pwd.struct_passwd | None) -> None:
    """Write a 0600 file atomically, owned by ``owner``; the temporary file is never followed as a link."""
    if owner is None:
        atomic_write(path, data, mode=0o600)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            os.fchown(out.fileno(), owner.pw_uid, owner.pw_gid)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
