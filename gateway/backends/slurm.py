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
anyway for the report. ``stop`` deletes the secret. When the view-only password is replaced (a share
link ended), ``refresh_passwords`` rewrites the secret and the running job, which compares the secret's
contents every 2 s, makes its password file again; Xvnc reads that file at every authentication.

State is ``{"job_id", "user", "workdir"}``. Status comes from one ``squeue`` snapshot per second
shared by every account (:class:`~gateway.backends.slurm_client.JobQueue`); a job missing from it is
GONE only when ``scontrol show job`` says it ended or that Slurm does not know it. A failing command
is UNKNOWN, never GONE.

The job as data (script, sbatch line, report) is :mod:`gateway.backends.slurm_job`; every Slurm
command goes through :mod:`gateway.backends.slurm_client`, which :mod:`gateway.backends.dcv` shares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import pwd
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.backends.base import Backend, BackendError, DesktopState, Endpoint, PollResult, Status
from gateway.backends.desktop_users import uid_min
from gateway.backends.slurm_client import JobQueue, SlurmClient, SlurmUnavailable, as_user, step_argv, why_failed
from gateway.backends.slurm_extend import extend_reservation, job_time_limit, partition_time_limit
from gateway.backends.slurm_job import (
    container_spec,
    job_name,
    output_tail,
    private_dir,
    read_report,
    render_job_script,
    report_mismatch,
    sbatch_argv,
    slurm_duration,
    write_secret,
)
from gateway.backends.slurm_parse import JobState
from gateway.common.files import atomic_write
from gateway.model.config import Config
from gateway.model.container import exec_argv
from gateway.model.tokens import Account
from gateway.model.viewonly import view_only_password, vncpasswd_input

__all__ = ["SlurmBackend", "SlurmDesktop", "JobPaths", "RESERVATION_RECORD", "job_home", "run_as_problems"]

log = logging.getLogger("gateway.slurm")

#: In the state dir: the reservation this gateway created (so only that one is ever deleted).
RESERVATION_RECORD = "slurm-reservation.json"
#: In an account's work directory: the password secret the job makes its VNC password file from.
SECRET_NAME = ".vnc-secret"
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


def job_home(config: Config, state_dir: Path, account_id: str) -> Path:
    """The HOME of an account's desktop jobs, where its files are (`gateway archive` packs it from there):
    the account user's home on the cluster file system (run_as: account), else its directory in the
    shared dir. KeyError when run_as is account and the user does not exist."""
    if config.slurm.run_as == "account":
        return Path(pwd.getpwnam(account_id).pw_dir)
    shared = Path(config.slurm.shared_dir) if config.slurm.shared_dir else state_dir / "slurm"
    return shared / account_id / "home"


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


@dataclass(frozen=True, slots=True)
class JobPaths:
    """An account's files for its jobs: its work directory (in the shared dir), the password secret, its HOME."""

    workdir: Path
    secret_file: Path
    home: str


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, config: Config, state_dir: Path, *, client: SlurmClient | None = None) -> None:
        """``client``: a Slurm client shared with another backend (its queue snapshot and submit limit)."""
        self.config = config
        self.settings = config.slurm
        self.state_dir = state_dir
        self.shared_dir = Path(self.settings.shared_dir) if self.settings.shared_dir else state_dir / "slurm"
        self.client = client or SlurmClient(timeout_s=self.settings.command_timeout_s,
                                            submit_concurrency=self.settings.submit_concurrency)
        self.reservation: str | None = self.settings.reservation
        #: The job whose report was last refused, by account (logged once per job).
        self._refused_reports: dict[str, int] = {}
        #: What `gateway extend` added to the event: jobs submitted since get it on top of time_limit_s.
        self.extra_time_s = 0.0
        #: Notices shown in desktops (srun steps running xmessage); each ends by itself.
        self._notices: list[asyncio.subprocess.Process] = []

    @property
    def queue(self) -> JobQueue:
        """The ``squeue`` snapshot (the client's, shared with any backend that shares the client)."""
        return self.client.queue

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
            result = await self.client.command("scontrol show reservation",
                                                ["scontrol", "show", "reservation", "-o", self.settings.reservation])
            if not result.ok or f"ReservationName={self.settings.reservation} " not in result.stdout.decode():
                raise BackendError(f"reservation {self.settings.reservation} does not exist: {why_failed(result)}")
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
            result = await self.client.command("scontrol create reservation", argv)
        except SlurmUnavailable as exc:
            self._record_path.unlink(missing_ok=True)
            raise BackendError(f"cannot create the event reservation: {exc}") from None
        if not result.ok:
            self._record_path.unlink(missing_ok=True)
            raise BackendError(f"cannot create the event reservation: {why_failed(result)}")
        log.info("event reservation created name=%s", name)
        return name

    def _read_record(self) -> str | None:
        try:
            data = json.loads(self._record_path.read_text())
            return str(data["name"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _reservation_exists(self, name: str) -> bool:
        result = await self.client.command("scontrol show reservation", ["scontrol", "show", "reservation", "-o", name])
        return result.ok and f"ReservationName={name} " in result.stdout.decode()

    async def close(self, *, final: bool) -> None:
        if not final:
            return
        name = self._read_record()
        if name is None:
            return
        if await self._reservation_exists(name):
            try:
                result = await self.client.command("scontrol delete reservation",
                                                    ["scontrol", "delete", "reservation", name], attempts=8)
            except SlurmUnavailable as exc:
                log.error("event reservation not deleted name=%s reason=%s", name, exc)
                return
            if not result.ok:
                log.error("event reservation not deleted name=%s reason=%s", name, why_failed(result))
                return
            log.info("event reservation deleted name=%s", name)
        self._record_path.unlink(missing_ok=True)

    # -- start ---------------------------------------------------------------------------------

    def job_user(self, account: Account) -> str | None:
        """The OS user ``account``'s jobs run as: its own with run_as: account, else None (the gateway's)."""
        return account.id if self.settings.run_as == "account" else None

    def paths(self, account: Account) -> JobPaths:
        workdir = self.shared_dir / account.id
        return JobPaths(workdir, workdir / SECRET_NAME, str(job_home(self.config, self.state_dir, account.id)))

    def prepare(self, account: Account) -> JobPaths:
        """The account's paths, with its work directory made private to its job's user."""
        paths = self.paths(account)
        user = self.job_user(account)
        try:
            private_dir(paths.workdir, pwd.getpwnam(user) if user else None)
        except OSError as exc:
            raise BackendError(f"cannot prepare {paths.workdir}: {exc.strerror or exc}") from None
        return paths

    async def submit(self, account: Account, script: str, sbatch: Sequence[str], workdir: Path) -> SlurmDesktop:
        """Submit ``script`` with the ``sbatch`` command line, as the account's job user."""
        user = self.job_user(account)
        job_id = await self.client.submit(as_user(user) + list(sbatch), script.encode(),
                                          job_name=job_name(self.config, account), user=user)
        return SlurmDesktop(job_id, user, str(workdir))

    async def start(self, account: Account) -> DesktopState:
        paths = self.prepare(account)
        self._write_password_secret(account, paths.secret_file, self.job_user(account))
        script = render_job_script(self.config, account, home=paths.home, workdir=str(paths.workdir),
                                   secret_file=str(paths.secret_file))
        sbatch = sbatch_argv(self.config, account, reservation=self.reservation, workdir=str(paths.workdir),
                             extra_time_s=self.extra_time_s)
        desktop = await self.submit(account, script, sbatch, paths.workdir)
        log.info("desktop job submitted account=%s job=%d reservation=%s", account.id, desktop.job_id,
                 self.reservation)
        return desktop.to_state()

    # -- passwords -----------------------------------------------------------------------------

    def _write_password_secret(self, account: Account, secret_file: Path, user: str | None) -> None:
        """The secret the job makes its VNC password file from, owned by the job's ``user``: two lines,
        the full password, then the current view-only one for instructors."""
        try:
            write_secret(secret_file, vncpasswd_input(account.password, view_only_password(self.state_dir, account.id)),
                         pwd.getpwnam(user) if user else None)
        except OSError as exc:
            raise BackendError(f"cannot write the password secret {secret_file}: {exc.strerror or exc}") from None

    async def refresh_passwords(self, account: Account, state: DesktopState) -> None:
        """Rewrite the running job's secret; the job notices within seconds and makes its password file again
        (templates/desktop-job.sh.j2, watch_secret), which Xvnc reads at every authentication."""
        desktop = SlurmDesktop.from_state(state)
        if not desktop.workdir:
            raise BackendError(f"job {desktop.job_id} has no recorded work directory")
        # The file start() wrote for this job (stop() removes the same one), owned by the user the job runs as.
        self._write_password_secret(account, Path(desktop.workdir) / SECRET_NAME, desktop.user)
        log.info("password secret rewritten account=%s job=%d", account.id, desktop.job_id)

    # -- poll ----------------------------------------------------------------------------------

    def describe(self, state: DesktopState) -> dict[str, str]:
        return {"job_id": str(state["job_id"])} if "job_id" in state else {}

    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        desktop = SlurmDesktop.from_state(state)
        try:
            job_state_, info, raw = await self.client.job_status(desktop.job_id)
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
        report = read_report(desktop.workdir, desktop.job_id)
        if report is None or not node:
            return PollResult(Status.RUNNING, None,
                              f"job {desktop.job_id} runs on {node or '?'}; its desktop is starting")
        mismatch = report_mismatch(report, node=node, port=port)
        if mismatch is not None:
            if self._refused_reports.get(account.id) != desktop.job_id:
                self._refused_reports[account.id] = desktop.job_id
                log.warning("job report refused account=%s job=%d reason=%s", account.id, desktop.job_id, mismatch)
            return PollResult(Status.RUNNING, None, f"job {desktop.job_id}: its report was refused ({mismatch})")
        host = await self.client.node_address(node)
        return PollResult(Status.RUNNING, Endpoint(host, port), ends_at=times.end if times is not None else None)

    def _output_tail(self, account: Account, desktop: SlurmDesktop) -> str:
        """The last lines of the job's output file, for organisers; lines holding a password are left out."""
        return output_tail(desktop.workdir, desktop.job_id,
                           [account.password, view_only_password(self.state_dir, account.id)])

    # -- extend, notices -------------------------------------------------------------------------

    async def extend(self, account: Account, state: DesktopState, seconds: float) -> str:
        """Raise the running job's time limit (scontrol update TimeLimit=+MINUTES; needs Slurm admin rights),
        never beyond its partition's MaxTime, which Slurm lets its admin pass (gateway/backends/slurm_extend.py)."""
        desktop = SlurmDesktop.from_state(state)
        minutes = max(1, math.ceil(seconds / 60))
        limit = await job_time_limit(self.client, desktop.job_id)
        refusal = limit.refusal(minutes * 60) if limit is not None else None
        if refusal is not None:
            raise BackendError(f"job {desktop.job_id}: {refusal}")
        try:
            result = await self.client.command("scontrol update", ["scontrol", "update", f"JobId={desktop.job_id}",
                                                                    f"TimeLimit=+{minutes}"])
        except SlurmUnavailable as exc:
            raise BackendError(f"job {desktop.job_id} not extended: {exc}") from None
        if not result.ok:
            allowed = f" ({limit.allowed})" if limit is not None else ""
            raise BackendError(f"Slurm refused to extend job {desktop.job_id} by {minutes} min: "
                               f"{why_failed(result)}{allowed}")
        self.queue.invalidate()
        log.info("desktop job extended account=%s job=%d minutes=%d", account.id, desktop.job_id, minutes)
        return f"job {desktop.job_id}: time limit +{minutes} min"

    async def extend_event(self, seconds: float, done: set[str]) -> list[str]:
        """Jobs submitted from now on get ``seconds`` more, and the reservation the gateway made ends later."""
        lines = [await self._extend_new_jobs(seconds)]
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
            lines.append(await extend_reservation(self.client, name, seconds))
        except BackendError as exc:  # the line for new jobs still tells what was done
            lines.append(str(exc))
        return lines

    async def _extend_new_jobs(self, seconds: float) -> str:
        """Not beyond the partition's MaxTime: a job submitted beyond it would wait for ever."""
        limit = await partition_time_limit(self.client, self.settings.partition,
                                           self.settings.time_limit_s + self.extra_time_s)
        refusal = limit.refusal(seconds) if limit is not None else None
        if refusal is not None:
            return f"new desktop jobs: not extended: {refusal}"
        self.extra_time_s += seconds
        return f"new desktop jobs: time limit {slurm_duration(self.settings.time_limit_s + self.extra_time_s)}"

    def event_state(self) -> dict[str, Any]:
        return {"reservation": self.reservation, "extra_time_s": self.extra_time_s}

    def load_event_state(self, state: Mapping[str, Any]) -> str | None:
        """What `gateway extend` gave new jobs holds again while the reservation it was given in lasts (after
        a crash, or with slurm.reservation); a reservation made anew is the config's length, and so are its jobs."""
        extra = float(state.get("extra_time_s") or 0.0)
        if extra <= 0:
            return None
        if state.get("reservation") != self.reservation:
            return f"new desktop jobs: +{extra / 60:g} min was for reservation {state.get('reservation')}, not applied"
        self.extra_time_s = extra
        return f"new desktop jobs: time limit {slurm_duration(self.settings.time_limit_s + extra)}"

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        """A message window in the job's desktop: xmessage run inside the job (srun --overlap), as its user."""
        desktop = SlurmDesktop.from_state(state)
        report = read_report(desktop.workdir, desktop.job_id)
        display = (report or {}).get("display", "")
        if not display.isdigit():
            log.warning("notice not shown, the job reported no display account=%s job=%d", account.id, desktop.job_id)
            return
        self._notices = [proc for proc in self._notices if proc.returncode is None]
        inner = exec_argv(container_spec(self.config), ["/bin/sh", "-c", _NOTICE_SCRIPT, "notice", display, text])
        argv = step_argv(desktop.job_id, desktop.user, inner)
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
            await self.client.cancel(desktop.job_id, desktop.user)
        finally:
            if desktop.workdir:
                workdir = Path(desktop.workdir)
                (workdir / SECRET_NAME).unlink(missing_ok=True)
                (workdir / f"report-{desktop.job_id}").unlink(missing_ok=True)


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


