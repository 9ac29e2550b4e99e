"""What the operating system says, independently of the gateway's own records.

Re-adoption after a gateway SIGKILL is only real if the very same X server process still serves the
desktop: the same pid with the same start time (field 22 of /proc/PID/stat, in clock ticks since
boot; a reused pid has another), found by its command line, whichever user it runs as.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

__all__ = ["proc_files", "start_time", "xvnc_on_port", "the_xvnc_on_port"]


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


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (starttime), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 is fields[0]
    return int(fields[22 - 3])


def xvnc_on_port(port: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live Xvnc on this machine started with ``-rfbport PORT``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or not argv or Path(argv[0].decode(errors="replace")).name != "Xvnc":
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
