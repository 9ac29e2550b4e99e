"""Running external programs: one place where commands are started, timed, logged and stopped.

Two kinds of programs are run:

* short commands (``vncpasswd -f``, ``apache2 -t``, ``sbatch``...) through :func:`run`, which returns
  their output and never leaves a process behind, even when cancelled or timed out;
* long-lived services (Xvnc, websockify, Apache) through :func:`spawn`, each in its own session and
  process group, identified by :class:`ProcessIdentity` so that a later gateway can tell whether a
  recorded pid still belongs to the process it started (pids are reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.polling import Backoff, PollTimeout, poll_until, wait_for_port

__all__ = [
    "CommandResult",
    "CommandFailed",
    "CommandTimeout",
    "ProcessIdentity",
    "run",
    "spawn",
    "terminate_group",
    "process_start_time",
    "stat_fields",
    "group_members",
    "is_alive",
    "last_line",
    "spawn_listening",
    "stop_unless_listening",
]

log = logging.getLogger("gateway.proc")


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> "CommandResult":
        """Return self, or raise :class:`CommandFailed` if the command exited non-zero."""
        if self.returncode != 0:
            raise CommandFailed(self)
        return self


class CommandFailed(Exception):
    def __init__(self, result: CommandResult) -> None:
        self.result = result
        super().__init__(f"{result.argv[0]} exited with status {result.returncode}: "
                         f"{last_line(result.stderr) or '(no output)'}")


def last_line(output: bytes | str) -> str:
    """The last non-blank line of a program's output (its error message, usually), stripped."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class CommandTimeout(Exception):
    def __init__(self, argv: Sequence[str], timeout_s: float) -> None:
        self.argv = tuple(argv)
        super().__init__(f"{argv[0]} did not finish within {timeout_s:g} s")


async def run(
    argv: Sequence[str],
    *,
    timeout_s: float,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> CommandResult:
    """Run a short command to completion and return its output.

    Secrets go through ``input`` (stdin), never through ``argv``: argv is logged and is visible
    to every user in ``/proc/PID/cmdline``. On timeout or cancellation the command's whole
    process group is killed before this returns.
    """
    argv = tuple(str(a) for a in argv)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await proc.communicate(input)
    except TimeoutError:
        await _kill_and_reap(proc)
        log.warning("command timed out argv0=%s timeout_s=%g", argv[0], timeout_s)
        raise CommandTimeout(argv, timeout_s) from None
    except BaseException:
        await _kill_and_reap(proc)
        raise
    duration = time.monotonic() - started
    assert proc.returncode is not None
    log.debug("command argv=%s status=%d duration_s=%.3f", " ".join(argv), proc.returncode, duration)
    return CommandResult(argv, proc.returncode, stdout, stderr, duration)


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    # Reaping must finish even if our caller is being cancelled, or a zombie is left.
    await asyncio.shield(proc.wait())


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process as the gateway recorded it: enough to recognise it again after a restart."""

    pid: int
    pgid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/PID/stat

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "pgid": self.pgid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ProcessIdentity":
        return cls(int(data["pid"]), int(data["pgid"]), int(data["start_time"]))


def stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3 and on of ``/proc/PID/stat`` (state, ppid, pgrp, ...: field N is ``[N - 3]``), or None
    if there is no such process. ``pid`` may be ``"self"``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z":  # a zombie is dead, whatever its pid says
        return None
    return int(fields[19])


def is_alive(identity: ProcessIdentity) -> bool:
    """True only if the recorded process itself still runs (not another one that got its pid)."""
    return process_start_time(identity.pid) == identity.start_time


async def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_path: Path | None = None,
    process_group: int | None = None,
    pass_fds: Sequence[int] = (),
    stdin_devnull: bool = True,
) -> tuple[asyncio.subprocess.Process, ProcessIdentity]:
    """Start a long-lived program in a session of its own (or in ``process_group``).

    Its output goes to ``log_path`` (appended), or is discarded.
    """
    argv = tuple(str(a) for a in argv)
    out: Any = asyncio.subprocess.DEVNULL
    log_file = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child, closed below
        out = log_file
    try:
        group_kwargs: dict[str, Any] = (
            {"process_group": process_group} if process_group is not None else {"start_new_session": True}
        )
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin_devnull else None,
            stdout=out,
            stderr=out,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            **group_kwargs,
        )
    finally:
        if log_file is not None:
            log_file.close()
    start_time = process_start_time(proc.pid) or 0
    pgid = process_group if process_group is not None else proc.pid
    log.debug("spawned argv0=%s pid=%d pgid=%d", argv[0], proc.pid, pgid)
    return proc, ProcessIdentity(proc.pid, pgid, start_time)


async def terminate_group(
    identity: ProcessIdentity,
    *,
    grace_s: float = 5.0,
    proc: asyncio.subprocess.Process | None = None,
) -> None:
    """Stop a whole process group: SIGTERM, wait up to ``grace_s``, then SIGKILL.

    Pass ``proc`` when the process is our child so that it is reaped; an adopted process (started
    by an earlier gateway) is watched through /proc instead. The group is signalled only while
    its leader is still the recorded process, so a reused pgid is never hit.
    """
    if not _group_signal(identity, signal.SIGTERM, proc):
        if proc is not None:
            await asyncio.shield(proc.wait())
        return
    with contextlib.suppress(PollTimeout):
        await poll_until(lambda: _leader_gone(identity, proc), timeout_s=grace_s,
                         what=f"process group {identity.pgid} to stop", backoff=_GROUP_POLL)
    # Members of the group may outlive the leader (a session's terminal); SIGKILL the rest.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(identity.pgid, signal.SIGKILL)
    if proc is not None:
        await asyncio.shield(proc.wait())
    # SIGKILL is delivered asynchronously: wait until the members have exited, so that the ports
    # and files they held are free when this returns (a restart binds the same port at once).
    await _wait_group_gone(identity.pgid, timeout_s=2.0)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(entry.name) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


#: Waiting for a signalled group: it usually stops at once, so look soon, then at least every 50 ms.
_GROUP_POLL = Backoff(first_s=0.02, factor=1.5, max_s=0.05)


async def _wait_group_gone(pgid: int, *, timeout_s: float) -> None:
    with contextlib.suppress(PollTimeout):
        await poll_until(lambda: _group_gone(pgid), timeout_s=timeout_s,
                         what=f"process group {pgid} to exit", backoff=_GROUP_POLL)


def _group_gone(pgid: int) -> bool:
    """No live member left. Signal 0 answers the usual case (an empty group) without reading all of
    /proc, which a shutdown of hundreds of desktops and proxies would otherwise do once per group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a member runs as another user: look at /proc
    return not group_members(pgid)  # members left may be zombies, which hold nothing any more


def _leader_gone(identity: ProcessIdentity, proc: asyncio.subprocess.Process | None) -> bool:
    if proc is not None:
        return proc.returncode is not None
    return not is_alive(identity)


def _group_signal(
    identity: ProcessIdentity, sig: int, proc: asyncio.subprocess.Process | None
) -> bool:
    if proc is not None and proc.returncode is not None:
        # Leader already reaped; members of its group may still run.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(identity.pgid, signal.SIGKILL)
        return False
    if proc is None and not is_alive(identity):
        return False
    try:
        os.killpg(identity.pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def spawn_listening(
    argv: Sequence[str], *, host: str, port: int, timeout_s: float, **spawn_kwargs: Any
) -> tuple[asyncio.subprocess.Process, ProcessIdentity]:
    """:func:`spawn` a server and return once it accepts connections on host:port.

    If it exits first or does not listen in time, its process group is stopped and
    :class:`gateway.common.polling.PortNotReady` is raised: nothing is left half-started.
    """
    proc, identity = await spawn(argv, **spawn_kwargs)
    await stop_unless_listening(proc, identity, host=host, port=port, timeout_s=timeout_s)
    return proc, identity


async def stop_unless_listening(
    proc: asyncio.subprocess.Process, identity: ProcessIdentity, *, host: str, port: int, timeout_s: float
) -> None:
    """Return once the started ``proc`` accepts connections on host:port (the waiting half of
    :func:`spawn_listening`, for a process started otherwise, e.g. forked by a server).

    If it exits first, does not listen in time, or the wait is cancelled, its process group is
    stopped and the exception (:class:`gateway.common.polling.PortNotReady`) passes on.
    """
    try:
        await wait_for_port(host, port, timeout_s=timeout_s, exit_status=lambda: proc.returncode)
    except BaseException:
        await terminate_group(identity, grace_s=2, proc=proc)
        raise
