"""What the operating system says, independently of the gateway's own records.

Re-adoption after a gateway SIGKILL is only real if the very same X server process still serves the
desktop: the same pid with the same start time (field 22 of /proc/PID/stat, in clock ticks since
boot; a reused pid has another), found by its command line, whichever user it runs as.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.common.netstat import parse_proc_net_tcp

__all__ = ["ProcStat", "proc_stat", "processes", "proc_files", "start_time", "xvnc_on_port", "the_xvnc_on_port", "listening_ports", "listening_addresses"]

_LISTEN = "0A"  # the TCP state of a listening socket in /proc/net/tcp


def proc_files(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, contents of /proc/PID/NAME) of every process on this machine whose file could be read: a
    process may end, or be another user's, between listing /proc and reading its file."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / name).read_bytes()
        except OSError:
            continue
        yield int(entry.name), data


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat that the tests look at (proc(5) numbers them from 1)."""

    pid: int
    comm: str  # field 2, without its parentheses (it may hold spaces and parentheses itself)
    state: str  # field 3: R, S, Z, ...
    ppid: int  # field 4
    pgid: int  # field 5
    start_time: int  # field 22, clock ticks since boot: a reused pid has another

    @classmethod
    def parse(cls, pid: int, data: bytes | str) -> "ProcStat":
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 is fields[0]
        return cls(pid, text[text.index("(") + 1:text.rindex(")")], fields[0], int(fields[1]), int(fields[2]),
                   int(fields[22 - 3]))


def proc_stat(pid: int) -> ProcStat | None:
    """``pid``'s stat line, or None when there is no such process."""
    try:
        return ProcStat.parse(pid, Path(f"/proc/{pid}/stat").read_bytes())
    except OSError:
        return None


def processes() -> Iterator[ProcStat]:
    """Every process on this machine whose stat line could be read."""
    for pid, data in proc_files("stat"):
        yield ProcStat.parse(pid, data)


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (starttime), or None when there is no such process."""
    found = proc_stat(pid)
    return found.start_time if found is not None else None


def xvnc_on_port(port: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live Xvnc on this machine started with ``-rfbport PORT``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found_stat = proc_stat(int(entry.name))
        if found_stat is None or found_stat.state == "Z" or not argv or Path(argv[0].decode(errors="replace")).name != "Xvnc":
            continue
        if any(a == b"-rfbport" and b == str(port).encode() for a, b in zip(argv, argv[1:])):
            started = start_time(int(entry.name))
            if started is not None:
                found.append((int(entry.name), started))
    return sorted(found)


def the_xvnc_on_port(port: int) -> tuple[int, int]:
    """The one Xvnc serving ``port``: (pid, start time); fails if there is none or more than one."""
    found = xvnc_on_port(port)
    assert len(found) == 1, f"Xvnc processes with -rfbport {port}: {found}"
    return found[0]


def _listening() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in this network namespace."""
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            text = Path(f"/proc/net/{name}").read_text()
        except OSError:
            continue
        found |= {local for local, _, state in parse_proc_net_tcp(text) if state == _LISTEN}
    return found


def listening_ports() -> set[int]:
    """The TCP ports a socket listens on, on any address, in this network namespace (whichever process
    holds it: a child of a fork server names nothing of the gateway that started it)."""
    return {port for _, port in _listening()}


def listening_addresses(port: int) -> set[str]:
    """The addresses a socket listens on TCP ``port`` at, as the kernel reports them (0.0.0.0 and :: are
    every address of the machine)."""
    return {address for address, bound in _listening() if bound == port}
