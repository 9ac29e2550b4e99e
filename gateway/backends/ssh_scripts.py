"""The constant shell scripts the SSH backend runs on a VNC host, and pure parsers of what they print.

Every remote command is an argv list, quoted with :func:`shlex.join` in one place,
:func:`remote_command`. Where a shell is needed (redirections, background processes) a constant
script from this module runs as ``sh -c SCRIPT NAME ARG...`` (:func:`script`): values from the token
file or the config only ever reach the host as quoted positional parameters. Secrets (the VNC
password) reach a script on standard input, never on a command line.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.backends.xauth import xauthority_shell

__all__ = [
    "WRITE_PASSWORD", "REFRESH_PASSWORD", "LAUNCH", "PROBE", "PREPARE_HOST", "READ_PIDFILES",
    "remote_command", "script", "shown",
    "ProcessInfo", "ProbeReport", "LaunchReport", "RemoteProcess", "parse_stat", "parse_probe", "parse_launch",
    "parse_arrival",
]

#: Shell text shared by the scripts that write a VNC password file: ``vncpasswd -f`` turns the passwords
#: on stdin into "$file", written beside it and renamed, because Xvnc reads that file at every
#: authentication and must never see half of it.
_PASSWORD_FILE = r"""umask 077
"$vncpasswd" -f >"$file.tmp"
if [ "$(wc -c <"$file.tmp")" -lt 8 ]; then echo "vncpasswd -f wrote no password" >&2; exit 3; fi
mv -f -- "$file.tmp" "$file"
"""

#: $1 vncpasswd, $2 password file, $3 Xauthority file, $4... directories to create. The passwords come on
#: stdin. Before a start: the password file and a new X cookie.
WRITE_PASSWORD = r"""set -eu
vncpasswd=$1 file=$2 xauthority=$3
shift 3
umask 077
mkdir -p -- "$@"
""" + _PASSWORD_FILE + r"""# The desktop's X cookie (Xvnc -auth): one MIT-MAGIC-COOKIE-1 for any display,
# in libXau's format.
""" + xauthority_shell('"$xauthority.tmp"') + r"""
mv -f -- "$xauthority.tmp" "$xauthority"
"""

#: $1 vncpasswd, $2 the password file the running Xvnc was started with. The passwords come on stdin.
#: Only the password file: a new X cookie would lock the running session out of its own display.
REFRESH_PASSWORD = r"""set -eu
vncpasswd=$1 file=$2
""" + _PASSWORD_FILE

#: $1 log file, $2 pid file, $3 display file or "-", $4 seconds to wait for the display, then argv.
#: Starts argv detached (own session, stdin from /dev/null, output to the log) and reports it.
LAUNCH = r"""set -u
log=$1 pidfile=$2 displayfile=$3 wait_s=$4
shift 4
(umask 077; : >>"$log")
if [ "$displayfile" = - ]; then
    setsid "$@" </dev/null >>"$log" 2>&1 &
else
    : >"$displayfile"
    setsid "$@" 3>"$displayfile" </dev/null >>"$log" 2>&1 &
fi
pid=$!
stat=$(cat "/proc/$pid/stat" 2>/dev/null) || stat=
start=$(printf '%s\n' "$stat" | sed 's/.*) //' | cut -d' ' -f20)
echo "$pid $start" >"$pidfile"
echo "pid $pid"
echo "boot $(cat /proc/sys/kernel/random/boot_id)"
echo "stat $stat"
if [ "$displayfile" != - ]; then
    waited=0
    while ! [ -s "$displayfile" ]; do
        state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
        case $state in
            ''|Z) echo "exited"; tail -n 5 "$log" | sed 's/^/log /'; exit 3 ;;
        esac
        waited=$((waited + 1))
        if [ "$waited" -gt $((wait_s * 10)) ]; then echo "timeout"; exit 4; fi
        sleep 0.1
    done
    echo "display $(cat "$displayfile")"
fi
echo end
"""

#: $1... pids. Prints the boot id, then each pid's stat line and command line (argv joined by \037).
PROBE = r"""echo "boot $(cat /proc/sys/kernel/random/boot_id)"
for pid do
    echo "pid $pid"
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) && echo "stat $stat"
    cmd=$(tr '\000' '\037' 2>/dev/null <"/proc/$pid/cmdline") && echo "cmdline $cmd"
done
echo end
"""

#: $1 state dir. Creates its layout and prints its absolute path, the host's boot id, and the address of the
#: host this SSH connection arrived at (the third word of sshd's SSH_CONNECTION, "client_ip client_port
#: server_ip server_port"; empty without one).
PREPARE_HOST = r"""set -eu
umask 077
mkdir -p -- "$1/secrets" "$1/logs" "$1/run" "$1/workspaces"
cd -- "$1"
echo "dir $(pwd -P)"
echo "boot $(cat /proc/sys/kernel/random/boot_id)"
set -f
set -- ${SSH_CONNECTION:-}
echo "arrived ${3:-}"
"""

#: $1... pid files written by LAUNCH. Prints "PID START" of each that exists.
READ_PIDFILES = r"""for f do [ -r "$f" ] && head -n 1 -- "$f"; done; exit 0
"""

_SCRIPTS: dict[str, str] = {
    "write-password": WRITE_PASSWORD,
    "refresh-password": REFRESH_PASSWORD,
    "launch": LAUNCH,
    "probe": PROBE,
    "prepare-host": PREPARE_HOST,
    "read-pidfiles": READ_PIDFILES,
}


def remote_command(argv: Sequence[str]) -> str:
    """The one place where an argv list becomes the command string sshd hands to the user's shell."""
    if isinstance(argv, str):
        raise TypeError("remote commands are argv lists, not strings")
    return shlex.join(str(a) for a in argv)


def script(name: str, *args: object) -> list[str]:
    """argv running the constant script ``name`` with ``args`` as its positional parameters ($0 is the name)."""
    return ["sh", "-c", _SCRIPTS[name], name, *(str(a) for a in args)]


def shown(argv: Sequence[str]) -> str:
    """argv for the log, with a constant script replaced by its name."""
    if len(argv) >= 4 and argv[0] == "sh" and argv[1] == "-c":
        return shlex.join([f"[{argv[3]}]", *argv[4:]])
    return shlex.join(argv)


# -- pure parsers of the scripts' output ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One remote process as /proc showed it."""

    state: str  # R, S, D, Z...
    start_time: int  # clock ticks since boot (field 22 of /proc/PID/stat)
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProbeReport:
    boot_id: str
    #: Each asked-for pid: its info, or None if no such process exists.
    processes: Mapping[int, ProcessInfo | None]


def parse_arrival(value: str) -> str | None:
    """The host address PREPARE_HOST's "arrived" line names, if it is one IP address (a link-local IPv6
    address with its %zone); None for anything else (sshd set no SSH_CONNECTION there)."""
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return None
    return value if value.isprintable() and " " not in value else None


def parse_stat(line: str) -> tuple[str, int]:
    """(state, start time) from a ``/proc/PID/stat`` line; ValueError if it is not one."""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    close = line.rindex(")")
    fields = line[close + 2:].split()
    if len(fields) < 20:
        raise ValueError(f"short stat line: {line[:80]!r}")
    return fields[0], int(fields[19])


def parse_probe(text: str) -> ProbeReport:
    """Parse PROBE's output; ValueError if it is incomplete (then nothing can be concluded)."""
    boot_id = ""
    processes: dict[int, ProcessInfo | None] = {}
    current: int | None = None
    stat: tuple[str, int] | None = None
    complete = False

    def finish() -> None:
        if current is not None and current not in processes:
            processes[current] = None

    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "boot":
            boot_id = value.strip()
        elif key == "pid":
            finish()
            current, stat = int(value), None
        elif key == "stat" and current is not None:
            stat = parse_stat(value)
        elif key == "cmdline" and current is not None and stat is not None:
            argv = tuple(a for a in value.split("\x1f") if a) if value else ()
            processes[current] = ProcessInfo(stat[0], stat[1], argv)
        elif key == "end":
            complete = True
    finish()
    if not complete or not boot_id:
        raise ValueError("the process check's output was incomplete")
    return ProbeReport(boot_id, processes)


@dataclass(frozen=True, slots=True)
class LaunchReport:
    pid: int
    start_time: int
    boot_id: str
    #: The X display number (only when asked to wait for one).
    display: int | None
    #: Why it did not start ("exited", "timeout"), and the last lines of its log.
    failure: str = ""
    log_tail: tuple[str, ...] = ()


def parse_launch(text: str) -> LaunchReport:
    """Parse LAUNCH's output; ValueError if it is not a launch report."""
    values: dict[str, str] = {}
    failure = ""
    tail: list[str] = []
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("pid", "boot", "stat", "display"):
            values[key] = value.strip()
        elif key in ("exited", "timeout"):
            failure = key
        elif key == "log":
            tail.append(value)
        elif key == "end":
            values["end"] = ""
    if "pid" not in values or "boot" not in values:
        raise ValueError("no launch report")
    start_time = 0
    if values.get("stat"):
        _, start_time = parse_stat(values["stat"])
    display = values.get("display")
    if not failure and "end" not in values:
        raise ValueError("the launch report was cut short")
    return LaunchReport(int(values["pid"]), start_time, values["boot"],
                        int(display) if display and display.isdigit() else None, failure, tuple(tail))


@dataclass(frozen=True, slots=True)
class RemoteProcess:
    """A process the backend started on a host: enough to recognise it again, and only it."""

    pid: int
    start_time: int
    #: An argument its command line must contain (Xvnc's password file), or None.
    marker: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "marker": self.marker}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RemoteProcess":
        marker = data.get("marker")
        return cls(int(data["pid"]), int(data["start_time"]), str(marker) if marker is not None else None)

    def found_in(self, report: ProbeReport) -> bool:
        """True only if this very process still runs (a zombie, or a reused pid, does not count)."""
        info = report.processes.get(self.pid)
        if info is None or info.state == "Z" or info.start_time != self.start_time:
            return False
        return self.marker is None or self.marker in info.argv
