"""NICE DCV sessions on GPU nodes, with the ordinary VNC desktop as the fallback (``backend: dcv``).

Composition, not a new scheduler: :class:`DcvBackend` wraps a :class:`SlurmBackend`, which does the
submitting, the report files, ``run_as`` and cancelling, through the Slurm client
(:mod:`gateway.backends.slurm_client`: the shared ``squeue`` snapshot, ``sinfo``, ``srun`` steps),
using only their public names. Only the job differs: ``templates/dcv-job.sh.j2`` runs ``dcv
create-session --type virtual --owner USER [--init SCRIPT] SESSION``, waits until ``dcv describe-session SESSION -j`` reports it, writes the report
(node, port, session id) and lives as long as the session; cancelling the job closes the session.

``start`` first asks ``sinfo`` about the GPU partition, then submits the GPU job (``--gres``) and waits
up to ``dcv.wait_s`` (queueing included) until the session is reported and its web server answers.
When there is no usable GPU partition, no GPU within the wait, or the DCV job fails, the account gets
the ordinary VNC desktop instead, through the same Slurm backend: on the GPU partition when it has a
node with room, else on the desktop partition. The reason is kept in the state, logged, and shown
(``describe`` gives it as ``note``). Waiting inside ``start`` holds one of the supervisor's start
slots for at most ``dcv.wait_s``; in exchange a fallback needs no restart and no second state.

State: the Slurm state (``job_id``, ``user``, ``workdir``) plus ``protocol`` ("dcv" or "vnc"), and for
DCV ``session_id``, ``owner`` and ``dcv_path``; for a fallback ``fallback`` (why) and ``partition``.
Readiness of a DCV session is its web server answering HTTP at the web-url-path on NODE:PORT, not an
RFB handshake. Participants reach it only through :mod:`gateway.web.dcv_proxy`, after signing in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import pwd
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from gateway.backends.base import READY_PROBE_TIMEOUT_S, Backend, BackendError, DesktopState, Endpoint, PollResult
from gateway.backends.dcv_access import connection_file, upstream_ssl, web_url_path
from gateway.backends.slurm import SlurmBackend
from gateway.backends.slurm_client import SlurmUnavailable, step_argv, why_failed
from gateway.backends.slurm_job import job_name, render_script, sbatch_argv
from gateway.backends.slurm_parse import JobState, PartitionInfo
from gateway.common.polling import Backoff, PollTimeout, poll_until
from gateway.common.proc import CommandTimeout, run
from gateway.model.config import Config
from gateway.model.tokens import Account

__all__ = ["DcvBackend", "render_dcv_job_script", "dcv_sbatch_argv", "connection_file", "web_url_path",
           "session_prefix", "partition_problem"]

log = logging.getLogger("gateway.dcv")

#: Longest time `srun ... dcv close-session` may take when a DCV desktop is stopped.
CLOSE_TIMEOUT_S = 20.0
#: How often start() looks at a DCV job while waiting for its session.
WAIT_STEP_S = 0.5
#: Node states (sinfo %t, without its suffix) in which a node can take another job.
_ROOMY_STATES = frozenset({"idle", "mix"})
_USABLE_STATES = frozenset({"idle", "mix", "alloc", "comp", "resv", "plnd"})


# -- pure pieces ----------------------------------------------------------------------------------


def session_prefix(config: Config, account: Account) -> str:
    """DCV session ids are PREFIX-JOBID; DCV allows letters, digits, - and _ only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", job_name(config, account))


def _on_partition(config: Config, partition: str) -> Config:
    return dataclasses.replace(config, slurm=dataclasses.replace(config.slurm, partition=partition))


def render_dcv_job_script(config: Config, account: Account, *, home: str, workdir: str, owner: str) -> str:
    """The batch script of ``account``'s DCV job. Every value is quoted; no password is in it."""
    d = config.dcv
    return render_script(
        "dcv-job.sh.j2", account, home=home, workdir=workdir,
        dcv=d.dcv_path,
        owner=owner,
        session_prefix=session_prefix(config, account),
        session_type=d.session_type,
        init_script=d.init_script or "",
        port=d.port,
        wait_s=math.ceil(d.wait_s),
        report_tries=math.ceil(d.wait_s / 0.5),
    )


def dcv_sbatch_argv(config: Config, account: Account, *, reservation: str | None, workdir: str) -> list[str]:
    """``sbatch`` for a DCV job: the desktop job's options, on the GPU partition, with the GRES."""
    d = config.dcv
    argv = sbatch_argv(_on_partition(config, d.partition), account,
                       reservation=reservation if d.use_reservation else None, workdir=workdir)
    if d.gres:
        argv.append(f"--gres={d.gres}")
    return argv


def partition_problem(rows: Sequence[PartitionInfo], partition: str, gres: str) -> tuple[str | None, bool]:
    """From sinfo's rows for the partition (:meth:`SlurmClient.partition`): (why DCV cannot run there
    or None, whether a node of it has room for another job)."""
    if not rows:
        return f"there is no partition {partition}", False
    up = [row for row in rows if row.available == "up"]
    roomy = any(_node_state(row) in _ROOMY_STATES for row in up)
    if not up:
        return f"partition {partition} is not up", False
    usable = [row for row in up if _node_state(row) in _USABLE_STATES]
    if not usable:
        return f"partition {partition} has no node in service", False
    name = gres.split(":", 1)[0]
    if name and not any(name in row.gres for row in usable):
        return f"the nodes of partition {partition} have no {name} (GRES)", roomy
    return None, roomy


def _node_state(row: PartitionInfo) -> str:
    """The node state without sinfo's suffixes (``*`` not responding, ``~`` powered off, ...)."""
    return row.node_state.rstrip("*~#!%$@^-")


# -- the backend ----------------------------------------------------------------------------------


class DcvBackend(Backend):
    name = "dcv"

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.settings = config.dcv
        #: Submits, polls and cancels every job of this backend (DCV, and VNC on the desktop partition).
        self.slurm = SlurmBackend(config, state_dir)
        #: VNC fallbacks on the GPU partition; shares the other's Slurm client (its queue snapshot and
        #: submit limit) and reservation.
        self.gpu_vnc = SlurmBackend(_on_partition(config, self.settings.partition), state_dir,
                                    client=self.slurm.client)

    # -- open / close ----------------------------------------------------------------------------

    async def open(self, accounts: Sequence[Account]) -> None:
        await self.slurm.open(accounts)
        self.gpu_vnc.reservation = self.slurm.reservation if self.settings.use_reservation else None

    async def close(self, *, final: bool) -> None:
        await self.slurm.close(final=final)

    # -- start -------------------------------------------------------------------------------------

    async def start(self, account: Account) -> DesktopState:
        problem, roomy = await self._check_partition()
        if problem is not None:
            return await self._fall_back(account, problem, roomy)
        state = await self._submit(account)
        try:
            failure = await self._await_session(account, state)
        except BaseException:
            await self._discard(account, state)
            raise
        if failure is None:
            log.info("DCV session ready account=%s job=%s session=%s", account.id, state["job_id"],
                     state["session_id"])
            return state
        await self._discard(account, state)
        _, roomy = await self._check_partition()
        return await self._fall_back(account, failure, roomy)

    async def _check_partition(self) -> tuple[str | None, bool]:
        d = self.settings
        try:
            rows = await self.slurm.client.partition(d.partition)
        except SlurmUnavailable as exc:
            return str(exc), False
        return partition_problem(rows, d.partition, d.gres)

    def _owner(self, account: Account) -> str:
        if self.config.slurm.run_as == "account":
            return account.id
        return pwd.getpwuid(os.geteuid()).pw_name

    async def _submit(self, account: Account) -> DesktopState:
        paths = self.slurm.prepare(account)
        owner = self._owner(account)
        script = render_dcv_job_script(self.config, account, home=paths.home, workdir=str(paths.workdir), owner=owner)
        sbatch = dcv_sbatch_argv(self.config, account, reservation=self.slurm.reservation, workdir=str(paths.workdir))
        desktop = await self.slurm.submit(account, script, sbatch, paths.workdir)
        log.info("DCV job submitted account=%s job=%d partition=%s gres=%s", account.id, desktop.job_id,
                 self.settings.partition, self.settings.gres or "-")
        return {**desktop.to_state(), "protocol": "dcv",
                "session_id": f"{session_prefix(self.config, account)}-{desktop.job_id}", "owner": owner,
                "dcv_path": self.settings.dcv_path}

    async def _await_session(self, account: Account, state: DesktopState) -> str | None:
        """None once the session is reported and its web server answers; else why not, after dcv.wait_s."""
        job_id = int(state["job_id"])
        last = "the DCV job was not seen yet"

        async def outcome() -> str | bool | None:
            """True once ready, why not once it can't be any more, None while it may still be."""
            nonlocal last
            try:
                job_state, info, raw = await self.slurm.client.job_status(job_id)
            except SlurmUnavailable as exc:
                last = f"Slurm does not answer: {exc}"
                return None
            if job_state is JobState.PENDING:
                why = info.reason if info is not None and info.reason not in ("", "None") else "waiting"
                last = f"no free GPU in partition {self.settings.partition} (job {job_id} queued: {why})"
            elif job_state in (JobState.ENDED, JobState.COMPLETING):
                return f"the DCV job {job_id} ended ({raw}); its output: {state['workdir']}/job-{job_id}.out"
            elif job_state is JobState.RUNNING:
                result = await self.slurm.poll(account, state)
                if result.endpoint is None:
                    last = f"DCV did not report session {state['session_id']}"
                    return None
                try:
                    await self.prove_ready(account, state, result.endpoint)
                    return True
                except (OSError, TimeoutError, BackendError) as exc:
                    last = f"the DCV web server on {result.endpoint} does not answer ({exc or type(exc).__name__})"
            return None

        try:
            verdict = await poll_until(outcome, timeout_s=self.settings.wait_s, what="DCV session",
                                       backoff=Backoff(first_s=WAIT_STEP_S, factor=1.0, max_s=WAIT_STEP_S))
        except PollTimeout:
            return f"no DCV session within {self.settings.wait_s:g} s: {last}"
        return None if verdict is True else str(verdict)

    async def _discard(self, account: Account, state: DesktopState) -> None:
        """Stop a DCV job that will not be used; errors are logged (the job's time limit ends it anyway)."""
        try:
            await asyncio.shield(self.stop(account, state))
        except (BackendError, OSError) as exc:
            log.error("DCV job not cancelled account=%s job=%s reason=%s", account.id, state.get("job_id"), exc)

    async def _fall_back(self, account: Account, reason: str, roomy: bool) -> DesktopState:
        backend = self.gpu_vnc if roomy else self.slurm
        partition = backend.settings.partition or "(default)"
        log.warning("DCV not available, starting a VNC desktop instead account=%s partition=%s reason=%s",
                    account.id, partition, reason)
        state = await backend.start(account)
        return {**state, "protocol": "vnc", "fallback": reason, "partition": partition}

    # -- poll, readiness, facts ------------------------------------------------------------------

    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        # The report of either job names node and port; SlurmBackend turns them into the endpoint.
        return await self.slurm.poll(account, state)

    def protocol(self, state: DesktopState) -> str:
        return "dcv" if state.get("protocol") == "dcv" else "vnc"

    async def prove_ready(self, account: Account, state: DesktopState, endpoint: Endpoint) -> None:
        if self.protocol(state) != "dcv":
            await super().prove_ready(account, state, endpoint)
            return
        url = f"{self.settings.scheme}://{_url_host(endpoint.host)}:{endpoint.port}{web_url_path(self.config, account.id)}"
        timeout = aiohttp.ClientTimeout(total=READY_PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(url, allow_redirects=False, ssl=upstream_ssl(self.config)) as response:
                if not 200 <= response.status < 400:
                    raise BackendError(f"{url} answered HTTP {response.status}")

    def describe(self, state: DesktopState) -> Mapping[str, str]:
        facts = {"job_id": str(state["job_id"])} if "job_id" in state else {}
        facts["protocol"] = self.protocol(state)
        if self.protocol(state) == "dcv":
            facts["session_id"] = str(state.get("session_id", ""))
            facts["user"] = str(state.get("owner", ""))
        elif state.get("fallback"):
            facts["note"] = f"VNC instead of DCV: {state['fallback']}"
        return facts

    # -- extend, notices (the jobs are Slurm jobs) -------------------------------------------------

    async def extend(self, account: Account, state: DesktopState, seconds: float) -> str:
        return await self.slurm.extend(account, state, seconds)

    async def extend_event(self, seconds: float, done: set[str]) -> list[str]:
        lines = await self.slurm.extend_event(seconds, done)
        self.gpu_vnc.extra_time_s = self.slurm.extra_time_s  # VNC fallbacks get what the other jobs got
        return lines

    def event_state(self) -> dict[str, Any]:
        return self.slurm.event_state()  # gpu_vnc's jobs were given the same time

    def load_event_state(self, state: Mapping[str, Any]) -> str | None:
        line = self.slurm.load_event_state(state)
        self.gpu_vnc.extra_time_s = self.slurm.extra_time_s
        return line

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        if self.protocol(state) == "vnc":  # a DCV session has no X display of the gateway's making
            await self.slurm.notify(account, state, text)

    async def refresh_passwords(self, account: Account, state: DesktopState) -> None:
        # A VNC fallback is the Slurm desktop job, which picks up a rewritten secret (either Slurm backend
        # writes the same file: they share the shared dir). A DCV session has no VNC password to replace.
        if self.protocol(state) == "vnc":
            await self.slurm.refresh_passwords(account, state)

    # -- stop --------------------------------------------------------------------------------------

    async def stop(self, account: Account, state: DesktopState) -> None:
        if state.get("protocol") == "dcv":
            await self._close_session(state)
        await self.slurm.stop(account, state)

    async def _close_session(self, state: DesktopState) -> None:
        """``dcv close-session`` on the job's node, inside the job (srun --overlap); then the job is
        cancelled, and its exit trap closes the session too if this did not reach it."""
        job_id, session = str(state.get("job_id", "")), str(state.get("session_id", ""))
        if not job_id.isdigit() or not session:
            return
        argv = step_argv(job_id, state.get("user") or None,
                         [str(state.get("dcv_path") or self.settings.dcv_path), "close-session", session])
        try:
            result = await run(argv, timeout_s=CLOSE_TIMEOUT_S)
        except (CommandTimeout, OSError) as exc:
            log.warning("dcv close-session not run job=%s session=%s reason=%s", job_id, session, exc)
            return
        if result.ok:
            log.info("DCV session closed job=%s session=%s", job_id, session)
        else:
            log.info("dcv close-session did not run job=%s session=%s reason=%s", job_id, session, why_failed(result))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
