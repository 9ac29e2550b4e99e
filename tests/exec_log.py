"""Record every exec of a process tree with ``strace -f -e trace=execve``, to search it for secrets.

One snapshot of /proc misses short-lived processes (a ``vncpasswd``, an ``sbatch``, a job script, a
remote command run by sshd): strace sees every ``execve`` of a traced process and of all its
descendants, with the whole argument vector and environment (``-v``, ``-s 65536``), however short
they live, whichever user they run as.

- :meth:`ExecRecorder.command` wraps a command line so that it runs traced from its first
  instruction; the wrapped process keeps its pid (a launcher makes strace attach to itself, then
  execs the command), so signals sent to it reach the command itself, not strace.
- :meth:`ExecRecorder.attach` traces an already running process (a private sshd, the Slurm node's
  slurmd) and everything it starts from then on; :meth:`ExecRecorder.stop` detaches.

Run as a script, this file is that launcher: ``exec_log.py LOG PIDFILE -- ARGV...``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

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
        self._pidfiles: list[Path] = []  # where launchers wrote their strace's pid
        self._popens: list[subprocess.Popen[bytes]] = []

    def _next(self, what: str) -> Path:
        self._count += 1
        return self.directory / f"{self._count:02d}-{what}.strace"

    def command(self, argv: Sequence[str], what: str = "command") -> list[str]:
        """``argv`` wrapped so that it runs traced from its first exec on, under the same pid."""
        log = self._next(what)
        pidfile = log.with_suffix(".pid")
        self._pidfiles.append(pidfile)
        return [sys.executable, str(Path(__file__).resolve()), self.strace, str(log), str(pidfile), "--", *argv]

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
        for pidfile in self._pidfiles:
            try:
                self._tracers.append(int(pidfile.read_text()))
            except (OSError, ValueError):
                pass
        self._pidfiles.clear()
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
        for pid in self._tracers:  # launchers' tracers are not our children: wait for them to go
            while Path(f"/proc/{pid}").exists() and _comm(pid) == "strace" and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists() and _comm(pid) == "strace":
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


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _launch(strace: str, log: str, pidfile: str, argv: list[str]) -> None:
    """Make strace attach to this process, then exec ``argv`` (same pid, now traced)."""
    me = os.getpid()
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:  # strace, in a session of its own, not a child of the command
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.execvp(strace, [strace, *STRACE_OPTIONS, "-o", log, "-p", str(me)])
        Path(pidfile).write_text(str(grandchild))
        os._exit(0)
    os.waitpid(child, 0)
    _wait_traced(me)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    strace_, log_, pidfile_, separator, *argv_ = sys.argv[1:]
    assert separator == "--" and argv_, "usage: exec_log.py STRACE LOG PIDFILE -- ARGV..."
    _launch(strace_, log_, pidfile_, argv_)
