"""Record every exec of a process tree with ``strace -f -e trace=execve``, to search it for secrets.

One snapshot of /proc misses short-lived processes (a ``vncpasswd``, an ``sbatch``, a job script, a
remote command run by sshd): strace sees every ``execve`` of a traced process and of all its
descendants, with the whole argument vector and environment (``-v``, ``-s 65536``), however short
they live, whichever user they run as.

- :meth:`ExecRecorder.command` wraps a command line so that it runs traced from its first
  instruction. The wrapped process keeps its pid (``strace -D`` runs the tracer as a detached
  grandchild and the command in its own process), so signals sent to it reach the command itself,
  not strace. With ``--seccomp-bpf`` the kernel stops the command's processes only at ``execve``,
  not at every system call, so the traced tree runs at nearly full speed.
- :meth:`ExecRecorder.attach` traces an already running process (the Slurm node's slurmd) and
  everything it starts from then on. seccomp-bpf can't be added to a running process: everything
  under it stops at every system call while traced, so attach only what can't be started traced.
- :meth:`ExecRecorder.stop` detaches every tracer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.os_check import proc_files, proc_stat

__all__ = ["ExecRecorder", "STRACE_OPTIONS"]

STRACE_OPTIONS = ["-f", "-qq", "-v", "-s", "65536", "-e", "trace=execve", "-e", "signal=none"]


def _tracer_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _wait_traced(pid: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while _tracer_of(pid) == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"strace did not attach to {pid} within {timeout_s} s")
        time.sleep(0.01)


class ExecRecorder:
    """strace logs in ``directory``; :meth:`stop` ends every tracer it started."""

    def __init__(self, directory: Path, strace: str = "strace") -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.strace = strace
        self._count = 0
        self._tracers: list[int] = []  # strace pids
        self._command_logs: list[Path] = []  # the logs of wrapped commands' tracers, which name them
        self._popens: list[subprocess.Popen[bytes]] = []

    def _next(self, what: str) -> Path:
        self._count += 1
        return self.directory / f"{self._count:02d}-{what}.strace"

    def command(self, argv: Sequence[str], what: str = "command") -> list[str]:
        """``argv`` wrapped so that it runs traced from its first exec on, under the same pid."""
        log = self._next(what)
        self._command_logs.append(log)
        # A daemonized strace ignores SIGTERM unless told otherwise: stop() must be able to detach it.
        return [self.strace, "--daemonize=session", "--interruptible=waiting", "--seccomp-bpf", *STRACE_OPTIONS,
                "-o", str(log), "--", *argv]

    def attach(self, pid: int, what: str) -> None:
        """Trace the running process ``pid`` and everything it starts from now on."""
        log = self._next(what)
        tracer = subprocess.Popen([self.strace, *STRACE_OPTIONS, "-o", str(log), "-p", str(pid)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        self._tracers.append(tracer.pid)
        self._popens.append(tracer)
        _wait_traced(pid)

    def stop(self) -> None:
        """Detach every tracer (strace detaches from what it attached to on SIGTERM) and wait for it."""
        self._tracers += _tracers_writing(self._command_logs)
        self._command_logs.clear()
        for pid in self._tracers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for popen in self._popens:
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        deadline = time.monotonic() + 10
        for pid in self._tracers:  # wrapped commands' tracers are not our children: wait for them to go
            while _is_strace(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_strace(pid):
                os.kill(pid, signal.SIGKILL)
        self._tracers.clear()
        self._popens.clear()

    def logs(self) -> list[Path]:
        return sorted(self.directory.glob("*.strace"))

    def execs(self) -> list[str]:
        """Every recorded execve line (with its argv and environment), from every log."""
        lines = []
        for log in self.logs():
            lines += [line for line in log.read_text(errors="replace").splitlines() if "execve(" in line]
        return lines

    def programs(self) -> set[str]:
        """The base names of every program that was exec'd successfully."""
        names = set()
        for line in self.execs():
            if "= -1" in line or 'execve("' not in line:
                continue
            names.add(line.split('execve("', 1)[1].split('"', 1)[0].rsplit("/", 1)[-1])
        return names

    def holding(self, secrets: Iterable[str]) -> list[str]:
        """Where the record holds any of ``secrets`` (an exec's argv or environment, or anything else
        strace wrote), described without repeating the secret or the environment."""
        needles = [s for s in secrets if s]
        found = []
        for log in self.logs():
            for line in log.read_text(errors="replace").splitlines():
                hits = [i for i, n in enumerate(needles) if n in line]
                if not hits:
                    continue
                program = line.split('execve("', 1)[1].split('"', 1)[0] if 'execve("' in line else "?"
                argv = line.split("], [", 1)[0]
                where = "argv" if any(needles[i] in argv for i in hits) else "environment or other output"
                found.append(f"{log.name}: pid {line.split()[0]} {program}: secret #{hits[0]} in its {where}")
        return found


def _is_strace(pid: int) -> bool:
    """Whether ``pid`` is a strace that still runs (an exited one, not yet reaped, is done writing)."""
    found = proc_stat(pid)
    return found is not None and found.comm == "strace" and found.state != "Z"


def _tracers_writing(logs: Sequence[Path]) -> list[int]:
    """The straces, still running, that write one of ``logs`` (found by the ``-o LOG`` of their command line)."""
    needles = [f"\0-o\0{log}\0".encode() for log in logs]
    return [pid for pid, cmdline in proc_files("cmdline")
            if any(needle in b"\0" + cmdline for needle in needles) and _is_strace(pid)]
