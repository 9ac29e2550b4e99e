"""``backend: ssh``: desktops on named VNC hosts, started, checked and stopped over SSH (asyncssh).

Each host gets one SSH connection, opened on first use and shared by all of its accounts; at most
``ssh.max_sessions_per_host`` commands run over it at once. With ``ssh.user: "{account}"`` each
account logs in as the user named like it instead (one connection per user and host, keyed
``user@host``), so its Xvnc, session and password file (under that user's ``ssh.state_dir``)
belong to that user and no other account's login can read them. Host keys are checked against
``ssh.known_hosts``: a host with no entry there, or with another key, is refused and only its
accounts fail, with a message that says which.

Every remote command is an argv list quoted with :func:`shlex.join` in one place,
:meth:`SshBackend._exec`. Where a shell is needed (redirections, background processes) a constant
script from this module runs as ``sh -c SCRIPT NAME ARG...``: values from the token file or the
config only ever reach the host as quoted positional parameters. The VNC password goes to
``vncpasswd -f`` on standard input, never on a command line.

On each host, under ``ssh.state_dir``::

    secrets/ACCOUNT.vncpasswd            0600, made by vncpasswd -f from stdin
    logs/ACCOUNT.xvnc.log, ACCOUNT.session.log
    run/ACCOUNT.xvnc.pid, ACCOUNT.session.pid, ACCOUNT.display, ACCOUNT/ (XDG_RUNTIME_DIR)
    workspaces/ACCOUNT                   (desktop.workspace, with {state_dir} meaning this directory)

Xvnc and the session each lead a session of their own (``setsid``), with their output in a log
file, so they outlive the SSH connection and the gateway. They are recognised later by the host's
boot id, their pid and their start time, and Xvnc also by its command line (which names its
password file), so a reused pid is never taken for, or signalled as, a desktop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from gateway.model.config import Config, RestartConfig
from gateway.model.container import ContainerSpec, exec_argv
from gateway.model.restart import RestartPolicy
from gateway.model.tokens import Account
from gateway.model.viewonly import view_only_password, vncpasswd_input
from gateway.backends.base import Backend, BackendError, DesktopState, Endpoint, PollResult, Status
from gateway.backends.local import DISPLAYFD_TIMEOUT_S, NOTICE_SECONDS, xvnc_argv

__all__ = [
    "SshBackend",
    "HostUnreachable",
    "RemoteProcess",
    "ProcessInfo",
    "ProbeReport",
    "parse_probe",
    "parse_launch",
    "parse_stat",
    "remote_command",
]

log = logging.getLogger("gateway.ssh")

#: The fd on which the remote Xvnc writes its display number (redirected to a file by LAUNCH).
DISPLAY_FD = 3
#: ssh.user meaning "each account logs in as the user named like it".
PER_ACCOUNT_USER = "{account}"
#: How long stop() waits between SIGTERM and SIGKILL, and how often it looks meanwhile.
STOP_GRACE_S = 5.0
STOP_CHECK_INTERVAL_S = 0.2
KEEPALIVE_INTERVAL_S = 15

# -- the constant remote scripts (user values arrive only as quoted positional parameters) ------

#: $1 vncpasswd, $2 password file, $3... directories to create. The password comes on stdin.
WRITE_PASSWORD = r"""set -eu
vncpasswd=$1 file=$2 xauthority=$3
shift 3
umask 077
mkdir -p -- "$@"
"$vncpasswd" -f >"$file.tmp"
if [ "$(wc -c <"$file.tmp")" -lt 8 ]; then echo "vncpasswd -f wrote no password" >&2; exit 3; fi
mv -f -- "$file.tmp" "$file"
# The desktop's X cookie (Xvnc -auth): one MIT-MAGIC-COOKIE-1 for any display, in libXau's format.
{ printf '\377\377\000\000\000\000\000\022MIT-MAGIC-COOKIE-1\000\020'; head -c 16 /dev/urandom; } >"$xauthority.tmp"
mv -f -- "$xauthority.tmp" "$xauthority"
"""

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

#: $1 state dir. Creates its layout and prints its absolute path and the host's boot id.
PREPARE_HOST = r"""set -eu
umask 077
mkdir -p -- "$1/secrets" "$1/logs" "$1/run" "$1/workspaces"
cd -- "$1"
echo "dir $(pwd -P)"
echo "boot $(cat /proc/sys/kernel/random/boot_id)"
"""

#: $1... pid files written by LAUNCH. Prints "PID START" of each that exists.
READ_PIDFILES = r"""for f do [ -r "$f" ] && head -n 1 -- "$f"; done; exit 0
"""

_SCRIPTS: dict[str, str] = {
    "write-password": WRITE_PASSWORD,
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


def _script(name: str, *args: object) -> list[str]:
    """argv running the constant script ``name`` with ``args`` as its positional parameters ($0 is the name)."""
    return ["sh", "-c", _SCRIPTS[name], name, *(str(a) for a in args)]


def _describe(exc: BaseException) -> str:
    """A connection error in words ("Connection refused", not "Connect call failed (...)")."""
    errno_ = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and errno_:
        return os.strerror(errno_)
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def login_key(host: str, user: str | None) -> str:
    """One SSH login: ``user@host`` for an account's own user, just the host for the shared ssh.user."""
    return f"{user}@{host}" if user else host


def split_login(where: str) -> tuple[str | None, str]:
    """(user or None, host) of a :func:`login_key` (host names never contain ``@``)."""
    user, sep, host = where.rpartition("@")
    return (user or None) if sep else None, host


def _shown(argv: Sequence[str]) -> str:
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


# -- state ---------------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class SshDesktop:
    host: str
    boot_id: str
    xvnc: RemoteProcess
    session: RemoteProcess | None
    display: int
    password_file: str
    #: pid and display files to remove with the desktop.
    run_files: tuple[str, ...]
    #: The account's own login user (ssh.user: "{account}"); None: ssh.user, the same for all.
    user: str | None = None

    @property
    def where(self) -> str:
        """The login the desktop was started over: ``user@host``, or the host for the shared login."""
        return login_key(self.host, self.user)

    def to_state(self) -> DesktopState:
        return {
            "host": self.host,
            "user": self.user,
            "boot_id": self.boot_id,
            "xvnc": self.xvnc.to_json(),
            "session": self.session.to_json() if self.session else None,
            "display": self.display,
            "password_file": self.password_file,
            "run_files": list(self.run_files),
        }

    @classmethod
    def from_state(cls, state: DesktopState) -> "SshDesktop":
        session = state.get("session")
        return cls(
            str(state["host"]),
            str(state["boot_id"]),
            RemoteProcess.from_json(state["xvnc"]),
            RemoteProcess.from_json(session) if session else None,
            int(state["display"]),
            str(state["password_file"]),
            tuple(str(f) for f in state.get("run_files", ())),
            str(state["user"]) if state.get("user") else None,
        )

    def processes(self) -> list[RemoteProcess]:
        return [self.xvnc] + ([self.session] if self.session else [])


# -- connections -----------------------------------------------------------------------------


class HostUnreachable(BackendError):
    """The host could not be reached or did not answer in time: nothing is known about it."""


@dataclass(frozen=True, slots=True)
class _HostInfo:
    state_dir: str  # absolute, on the host
    boot_id: str


@dataclass(frozen=True, slots=True)
class RemoteResult:
    argv: tuple[str, ...]
    exit_status: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def last_error_line(self) -> str:
        lines = self.stderr.strip().splitlines() or self.stdout.strip().splitlines()
        return lines[-1] if lines else "(no output)"


class _HostLink:
    """The one SSH connection to a host, opened when first needed and again after it is lost."""

    def __init__(self, backend: "SshBackend", host: str) -> None:
        self.backend = backend
        self.host = host
        self.sessions = asyncio.Semaphore(backend.settings.max_sessions_per_host)
        self.conn: asyncssh.SSHClientConnection | None = None
        self.info: _HostInfo | None = None
        self._info_conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._info_lock = asyncio.Lock()
        self._attempts = 0
        self._last_error: str | None = None

    async def connection(self) -> asyncssh.SSHClientConnection:
        seen = self._attempts
        async with self._lock:
            if self.conn is not None and not self.conn.is_closed():
                return self.conn
            if self._attempts != seen and self._last_error is not None:
                # Another account's attempt failed while this one waited: don't hammer the host.
                raise HostUnreachable(self._last_error)
            self._attempts += 1
            try:
                self.conn = await self.backend._connect(self.host)
            except HostUnreachable as exc:
                self._last_error = str(exc)
                raise
            self._last_error = None
            log.info("ssh connected host=%s", self.host)
            return self.conn

    def drop(self, conn: asyncssh.SSHClientConnection) -> None:
        if self.conn is conn:
            self.conn = None
        conn.close()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.wait_closed()


# -- the backend ---------------------------------------------------------------------------------


class SshBackend(Backend):
    name = "ssh"

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.settings = config.ssh
        self.state_dir = state_dir
        self._links: dict[str, _HostLink] = {}
        self._client_key: asyncssh.SSHKey | None = None
        #: Whether each account's session was alive at the last poll (for maintain()).
        self._session_alive: dict[str, bool] = {}
        container = config.container
        self.container: ContainerSpec | None = (
            ContainerSpec(container.runtime, container.image, container.binds)
            if container.runtime != "none" else None
        )

    # -- logins --------------------------------------------------------------------------------

    @property
    def per_account(self) -> bool:
        return self.settings.user == PER_ACCOUNT_USER

    def _user_of(self, account: Account) -> str | None:
        """The account's own login user with ssh.user "{account}", else None (the shared ssh.user)."""
        return account.id if self.per_account else None

    def _where(self, account: Account) -> str:
        return login_key(account.vnc_host, self._user_of(account))

    def _username(self, where: str) -> str | None:
        """Who logs in for ``where``: its own user, else ssh.user (None: the gateway's user)."""
        user, _ = split_login(where)
        return user or (None if self.per_account else self.settings.user)

    # -- paths -----------------------------------------------------------------------------------

    @property
    def private_key_path(self) -> str:
        return os.path.expanduser(self.settings.private_key)

    @property
    def known_hosts_path(self) -> str:
        return os.path.expanduser(self.settings.known_hosts)

    # -- connections -----------------------------------------------------------------------------

    def _link(self, host: str) -> _HostLink:
        link = self._links.get(host)
        if link is None:
            link = self._links[host] = _HostLink(self, host)
        return link

    def _load_key(self) -> asyncssh.SSHKey:
        if self._client_key is None:
            try:
                self._client_key = asyncssh.read_private_key(self.private_key_path)
            except (OSError, asyncssh.KeyImportError) as exc:
                raise BackendError(f"cannot read ssh.private_key {self.private_key_path}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        return self._client_key

    async def _connect(self, where: str) -> asyncssh.SSHClientConnection:
        """Connect, retrying with jittered backoff; HostUnreachable with the reason if it can't."""
        s = self.settings
        username = self._username(where)
        _, host = split_login(where)
        key = self._load_key()
        if not os.access(self.known_hosts_path, os.R_OK):
            raise HostUnreachable(f"cannot read ssh.known_hosts {self.known_hosts_path}: host keys can't be checked")
        options: dict[str, Any] = {
            "port": s.port,
            "client_keys": [key],
            "known_hosts": self.known_hosts_path,
            "config": None,  # never the gateway user's ~/.ssh/config
            "agent_path": None,
            "password_auth": False,
            "kbdint_auth": False,
            "gss_auth": False,
            "host_based_auth": False,
            "connect_timeout": s.connect_timeout_s,
            "login_timeout": s.connect_timeout_s,
            "keepalive_interval": KEEPALIVE_INTERVAL_S,
            "keepalive_count_max": 3,
        }
        if username:
            options["username"] = username
        policy = RestartPolicy(RestartConfig(max_attempts=s.connect_attempts, window_s=3600,
                                             backoff_initial_s=0.5, backoff_max_s=5.0))
        reason = "no attempt made"
        for attempt in range(1, s.connect_attempts + 1):
            try:
                async with asyncio.timeout(s.connect_timeout_s + 1):
                    return await asyncssh.connect(host, **options)
            except asyncssh.HostKeyNotVerifiable:
                raise HostUnreachable(self._host_key_problem(host)) from None
            except asyncssh.PermissionDenied:
                raise HostUnreachable(
                    f"{username or 'the gateway user'}@{host} refused the key {self.private_key_path} "
                    "(is its public key in that user's authorized_keys?)") from None
            except TimeoutError:
                reason = f"no answer within {s.connect_timeout_s:g} s"
            except (OSError, asyncssh.Error) as exc:
                reason = _describe(exc)
            log.warning("ssh connect failed host=%s user=%s attempt=%d reason=%s", host, username or "-",
                        attempt, reason)
            delay = policy.next_delay()
            if attempt < s.connect_attempts and delay is not None:
                await asyncio.sleep(delay)
        raise HostUnreachable(f"cannot connect to {host} port {s.port} over SSH: {reason} "
                              f"({s.connect_attempts} attempts)")

    def _host_key_problem(self, host: str) -> str:
        path = self.known_hosts_path
        port = self.settings.port
        try:
            known = asyncssh.read_known_hosts(path)
            keys, ca_keys, *_ = known.match(host, host, port)
        except (OSError, ValueError, asyncssh.Error):
            keys, ca_keys = [], []
        where = host if port == 22 else f"[{host}]:{port}"
        if keys or ca_keys:
            return (f"the host key of {where} does not match the one in {path}: refused. The host was "
                    f"reinstalled, or something is intercepting the connection; check the key, then "
                    f"update {path}")
        return (f"the host key of {where} is unknown: {path} has no entry for it, so it was refused. "
                f"Check the key, then add it (e.g. ssh-keyscan -p {port} {host} >> {path})")

    async def _exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout_s: float | None = None,
    ) -> RemoteResult:
        """Run one command on ``host`` over its shared connection (the only way commands reach a host).

        Secrets go through ``input`` (stdin), which is never logged. HostUnreachable when the host
        can't be reached, the connection breaks, or the command takes longer than ``timeout_s``.
        """
        argv = tuple(str(a) for a in argv)
        command = remote_command(argv)
        timeout_s = timeout_s or self.settings.command_timeout_s
        link = self._link(host)
        conn = await link.connection()
        async with link.sessions:
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout_s):
                    async with conn.create_process(
                        command, encoding="utf-8", errors="replace",
                        stdin=asyncssh.PIPE if input is not None else asyncssh.DEVNULL,
                    ) as process:
                        stdout, stderr = await process.communicate(input)
                        status = process.exit_status
            except TimeoutError:
                raise HostUnreachable(f"{_shown(argv)[:60]} on {host} did not finish within {timeout_s:g} s") from None
            except asyncssh.ChannelOpenError as exc:
                raise HostUnreachable(f"{host} refused a new SSH session: {exc.reason}") from None
            except (OSError, asyncssh.Error) as exc:
                link.drop(conn)
                raise HostUnreachable(f"lost the SSH connection to {host}: {exc or type(exc).__name__}") from None
        duration = time.monotonic() - started
        log.debug("ssh host=%s command=%s status=%s duration_s=%.3f", host, _shown(argv), status, duration)
        return RemoteResult(argv, status, stdout or "", stderr or "", duration)

    async def _host_info(self, host: str) -> _HostInfo:
        """The host's absolute state dir (created) and boot id, once per connection."""
        link = self._link(host)
        async with link._info_lock:
            conn = await link.connection()
            if link.info is not None and link._info_conn is conn:
                return link.info
            result = await self._exec(host, _script("prepare-host", self.settings.state_dir))
            values = dict(line.partition(" ")[::2] for line in result.stdout.splitlines())
            if not result.ok or not values.get("dir") or not values.get("boot"):
                raise BackendError(f"cannot create {self.settings.state_dir} on {host}: {result.last_error_line()}")
            link.info = _HostInfo(values["dir"], values["boot"].strip())
            link._info_conn = conn
            return link.info

    async def _probe(self, host: str, processes: Sequence[RemoteProcess]) -> ProbeReport:
        result = await self._exec(host, _script("probe", *(p.pid for p in processes)))
        try:
            return parse_probe(result.stdout)
        except ValueError as exc:
            raise HostUnreachable(f"checking processes on {host} failed: {exc} "
                                  f"(status {result.exit_status}: {result.last_error_line()})") from None

    # -- the Backend contract ------------------------------------------------------------------

    async def open(self, accounts: Sequence[Account]) -> None:
        """Check the key can be read; connections are opened when each host is first used."""
        self._load_key()
        for account in accounts:
            self._link(self._where(account))

    async def close(self, *, final: bool) -> None:
        await asyncio.gather(*(link.close() for link in self._links.values()))

    def _paths(self, info: _HostInfo, account: Account) -> dict[str, str]:
        base = info.state_dir
        return {
            "password": f"{base}/secrets/{account.id}.vncpasswd",
            "xvnc_log": f"{base}/logs/{account.id}.xvnc.log",
            "session_log": f"{base}/logs/{account.id}.session.log",
            "xvnc_pid": f"{base}/run/{account.id}.xvnc.pid",
            "session_pid": f"{base}/run/{account.id}.session.pid",
            "display": f"{base}/run/{account.id}.display",
            "xauthority": f"{base}/secrets/{account.id}.Xauthority",
            "runtime": f"{base}/run/{account.id}",
            "workspace": (self.config.desktop.workspace or "{state_dir}/workspaces/{account}").format(
                account=account.id, user=self._username(self._where(account)) or account.id, state_dir=base),
        }

    async def start(self, account: Account) -> DesktopState:
        host = self._where(account)  # the login: the account's own user on its host, or the shared user
        info = await self._host_info(host)
        paths = self._paths(info, account)
        result = await self._exec(
            host, _script("write-password", self.settings.vncpasswd, paths["password"], paths["xauthority"],
                          paths["workspace"],
                          paths["runtime"]),
            input=vncpasswd_input(account.password, view_only_password(self.state_dir, account.id)).decode(),
        )
        if not result.ok:
            raise BackendError(f"writing the VNC password file on {host} failed: {result.last_error_line()}")
        try:
            xvnc = await self._start_xvnc(account, info, paths)
            session = await self._start_session(account, info, paths, xvnc.display or 0)
        except BaseException:
            await self._abort_start(host, info, paths)
            raise
        assert xvnc.display is not None
        desktop = SshDesktop(
            account.vnc_host, info.boot_id,
            RemoteProcess(xvnc.pid, xvnc.start_time, paths["password"]),
            RemoteProcess(session.pid, session.start_time),
            xvnc.display, paths["password"],
            (paths["xvnc_pid"], paths["session_pid"], paths["display"], paths["xauthority"]),
            self._user_of(account),
        )
        self._session_alive[account.id] = True
        log.info("desktop started account=%s host=%s display=:%d vncport=%d pid=%d",
                 account.id, host, xvnc.display, account.vnc_port, xvnc.pid)
        return desktop.to_state()

    async def _launch(self, host: str, argv: Sequence[str], *, log_file: str, pid_file: str,
                      display_file: str | None) -> LaunchReport:
        wait_s = int(DISPLAYFD_TIMEOUT_S)
        result = await self._exec(
            host, _script("launch", log_file, pid_file, display_file or "-", wait_s, *argv),
            timeout_s=self.settings.command_timeout_s + wait_s,
        )
        try:
            report = parse_launch(result.stdout)
        except ValueError:
            raise BackendError(f"starting {Path(argv[0]).name} on {host} failed: {result.last_error_line()}") from None
        if report.failure or (display_file is not None and report.display is None):
            what = "exited at once" if report.failure == "exited" else (
                f"gave no display number within {wait_s} s" if report.failure == "timeout" else "did not start")
            detail = f": {report.log_tail[-1]}" if report.log_tail else ""
            raise BackendError(f"{Path(argv[0]).name} on {host} {what}{detail} (see {host}:{log_file})")
        return report

    async def _start_xvnc(self, account: Account, info: _HostInfo, paths: Mapping[str, str]) -> LaunchReport:
        d = self.config.desktop
        argv = xvnc_argv(
            xvnc=self.settings.xvnc, displayfd=DISPLAY_FD, rfb_port=account.vnc_port,
            password_file=Path(paths["password"]), geometry=d.geometry, depth=d.depth,
            desktop_name=account.id, max_cut_text=d.max_cut_text, interface=self.settings.interface,
            xauthority=Path(paths["xauthority"]),
        )
        if self.container is not None:
            argv = exec_argv(self.container, argv)
        return await self._launch(self._where(account), argv, log_file=paths["xvnc_log"],
                                  pid_file=paths["xvnc_pid"], display_file=paths["display"])

    async def _start_session(self, account: Account, info: _HostInfo, paths: Mapping[str, str],
                             display: int) -> LaunchReport:
        session = list(self.settings.session or self.config.desktop.session)
        if self.container is not None:
            session = exec_argv(self.container, session)
        env = {
            "DISPLAY": f":{display}",
            "HOME": paths["workspace"],
            "XDG_RUNTIME_DIR": paths["runtime"],
            "XAUTHORITY": paths["xauthority"],
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "SHELL": "/bin/bash",
            "TERM": "xterm-256color",
        }
        login = self._username(self._where(account))
        if login:
            env["USER"] = env["LOGNAME"] = login
        if self.config.desktop.keyboard_layout:
            env["GATEWAY_KEYBOARD_LAYOUT"] = self.config.desktop.keyboard_layout
        # A clean environment: nothing of the SSH session's leaks into the desktop.
        argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *session]
        return await self._launch(self._where(account), argv, log_file=paths["session_log"],
                                  pid_file=paths["session_pid"], display_file=None)

    async def _abort_start(self, host: str, info: _HostInfo, paths: Mapping[str, str]) -> None:
        """Undo a start that failed or was cancelled half-way: what was launched, by its pid files."""
        try:
            result = await self._exec(host, _script("read-pidfiles", paths["xvnc_pid"], paths["session_pid"]))
            launched = []
            for line in result.stdout.splitlines():
                pid, _, start = line.partition(" ")
                if pid.isdigit() and start.strip().isdigit():
                    launched.append(RemoteProcess(int(pid), int(start)))
            await self._terminate(host, info.boot_id, launched, grace_s=2)
            await self._exec(host, ["rm", "-f", "--", paths["password"], paths["xauthority"], paths["xvnc_pid"],
                                    paths["session_pid"], paths["display"]])
        except BackendError as exc:
            log.error("could not clean up a failed start host=%s: %s", host, exc)

    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        desktop = SshDesktop.from_state(state)
        endpoint = Endpoint(account.vnc_host, account.vnc_port)
        try:
            report = await self._probe(desktop.where, desktop.processes())
        except HostUnreachable as exc:
            return PollResult(Status.UNKNOWN, endpoint, str(exc))
        if report.boot_id != desktop.boot_id:
            return PollResult(Status.GONE, endpoint, f"{desktop.host} was restarted")
        if not desktop.xvnc.found_in(report):
            return PollResult(Status.GONE, endpoint, f"the X server on {desktop.host} exited")
        if desktop.session is not None:
            self._session_alive[account.id] = desktop.session.found_in(report)
        return PollResult(Status.RUNNING, endpoint)

    async def maintain(self, account: Account, state: DesktopState) -> DesktopState | None:
        """If the window manager session ended but the X server runs, start a new session."""
        if self._session_alive.get(account.id, True):
            return None
        desktop = SshDesktop.from_state(state)
        if desktop.session is None:
            return None
        info = await self._host_info(desktop.where)
        paths = self._paths(info, account)
        await self._terminate(desktop.where, desktop.boot_id, [desktop.session], grace_s=1)
        launched = await self._start_session(account, info, paths, desktop.display)
        self._session_alive[account.id] = True
        log.warning("session restarted account=%s host=%s display=:%d", account.id, desktop.host, desktop.display)
        session = RemoteProcess(launched.pid, launched.start_time)
        return SshDesktop(desktop.host, desktop.boot_id, desktop.xvnc, session, desktop.display,
                          desktop.password_file, desktop.run_files, desktop.user).to_state()

    async def workspace_sftp(self, account: Account) -> tuple[asyncssh.SFTPClient, str]:
        """An SFTP session on the account's login (its own user with "{account}") and the absolute path of
        its workspace there, for `gateway archive` (gateway/backends/remote_archive.py). The caller exits the session."""
        where = self._where(account)
        info = await self._host_info(where)
        conn = await self._link(where).connection()
        try:
            sftp = await conn.start_sftp_client()
        except (OSError, asyncssh.Error) as exc:
            raise HostUnreachable(f"{where} refused an SFTP session: {getattr(exc, 'reason', None) or exc}") from None
        return sftp, self._paths(info, account)["workspace"]

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        """A message window on the host's desktop (xmessage, detached like the session; it closes itself)."""
        desktop = SshDesktop.from_state(state)
        try:
            info = await self._host_info(desktop.where)
            paths = self._paths(info, account)
            argv = ["env", "-i", f"DISPLAY=:{desktop.display}", f"XAUTHORITY={paths['xauthority']}",
                    "PATH=/usr/local/bin:/usr/bin:/bin", "xmessage", "-center", "-timeout", str(NOTICE_SECONDS), text]
            await self._launch(desktop.where, argv, log_file=paths["session_log"],
                               pid_file=f"{info.state_dir}/run/{account.id}.notice.pid", display_file=None)
        except BackendError as exc:
            log.warning("notice not shown account=%s host=%s error=%s", account.id, desktop.host, exc)
            return
        log.info("notice shown account=%s host=%s display=:%d", account.id, desktop.host, desktop.display)

    async def stop(self, account: Account, state: DesktopState) -> None:
        """Stop exactly the processes start() launched (checked by identity first), remove the secret.

        Raises BackendError when the host can't be reached: the state is then kept, so a later
        `gateway down` or `gateway up` can still stop the desktop.
        """
        desktop = SshDesktop.from_state(state)
        self._session_alive.pop(account.id, None)
        try:
            await self._terminate(desktop.where, desktop.boot_id, desktop.processes(), grace_s=STOP_GRACE_S)
            await self._exec(desktop.where, ["rm", "-f", "--", desktop.password_file, *desktop.run_files])
        except HostUnreachable as exc:
            raise BackendError(f"could not stop the desktop of {account.id} on {desktop.host}: {exc}") from None
        log.info("desktop stopped account=%s host=%s", account.id, desktop.host)

    async def _terminate(self, host: str, boot_id: str, processes: Sequence[RemoteProcess], *,
                         grace_s: float) -> None:
        """SIGTERM the process groups of those ``processes`` that are still themselves, wait, SIGKILL.

        Each was started with setsid, so its pid is its process group id.
        """
        if not processes:
            return
        report = await self._probe(host, processes)
        if report.boot_id != boot_id:
            return  # the host restarted: nothing of ours runs there
        live = [p for p in processes if p.found_in(report)]
        if not live:
            return
        groups = [f"-{p.pid}" for p in live]
        await self._exec(host, ["kill", "-s", "TERM", "--", *groups])
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            await asyncio.sleep(STOP_CHECK_INTERVAL_S)
            report = await self._probe(host, live)
            if not any(p.found_in(report) for p in live):
                break
        # Members of a group may outlive its leader (a session's terminal): SIGKILL what is left.
        await self._exec(host, ["kill", "-s", "KILL", "--", *groups])
