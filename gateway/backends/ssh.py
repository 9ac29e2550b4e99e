"""``backend: ssh``: desktops on named VNC hosts, started, checked and stopped over SSH (asyncssh).

Each host gets one SSH connection, opened on first use and shared by all of its accounts; at most
``ssh.max_sessions_per_host`` commands run over it at once. With ``ssh.user: "{account}"`` each
account logs in as the user named like it instead (one connection per user and host, keyed
``user@host``), so its Xvnc, session and password file (under that user's ``ssh.state_dir``)
belong to that user and no other account's login can read them. Host keys are checked against
``ssh.known_hosts``: a host with no entry there, or with another key, is refused and only its
accounts fail, with a message that says which.

Every remote command is an argv list run by :meth:`SshHosts.exec
<gateway.backends.ssh_host.SshHosts.exec>`, the connections' one door. Where a shell is needed a
constant script of :mod:`gateway.backends.ssh_scripts` runs, with values only as quoted positional
parameters. The VNC password goes to ``vncpasswd -f`` on standard input, never on a command line.

On each host, under ``ssh.state_dir``::

    secrets/ACCOUNT.vncpasswd            0600, made by vncpasswd -f from stdin (again, in place, when the
                                         view-only password is replaced: refresh_passwords)
    logs/ACCOUNT.xvnc.log, ACCOUNT.session.log
    run/ACCOUNT.xvnc.pid, ACCOUNT.session.pid, ACCOUNT.display, ACCOUNT/ (XDG_RUNTIME_DIR)
    workspaces/ACCOUNT                   (desktop.workspace, with {state_dir} meaning this directory)

Xvnc and the session each lead a session of their own (``setsid``), with their output in a log
file, so they outlive the SSH connection and the gateway. They are recognised later by the host's
boot id, their pid and their start time, and Xvnc also by its command line (which names its
password file), so a reused pid is never taken for, or signalled as, a desktop.

Xvnc listens on one address of the host: with ``ssh.interface: auto`` the one the login's SSH connection
arrived at (:meth:`SshBackend.listen_address`), which is where the gateway connects to vnchost:vncport.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from gateway.backends.base import Backend, BackendError, DesktopState, Endpoint, PollResult, Status
from gateway.backends.desktop import DISPLAYFD_TIMEOUT_S, NOTICE_SECONDS, session_environment, xvnc_argv
from gateway.backends.ssh_host import HostInfo, HostUnreachable, SshHosts, login_key
from gateway.backends.ssh_scripts import LaunchReport, RemoteProcess, parse_launch, script
from gateway.model.config import Config
from gateway.model.config_checks import AUTO_INTERFACE
from gateway.model.container import ContainerSpec, exec_argv
from gateway.model.tokens import Account
from gateway.model.viewonly import view_only_password, vncpasswd_input

__all__ = ["SshBackend", "SshDesktop"]

#: The fd on which the remote Xvnc writes its display number (redirected to a file by LAUNCH).
DISPLAY_FD = 3
#: How long stop() waits between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0

log = logging.getLogger("gateway.ssh")


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


class SshBackend(Backend):
    name = "ssh"

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.settings = config.ssh
        self.state_dir = state_dir
        #: The connections to the hosts, and the commands run over them.
        self.hosts = SshHosts(config.ssh)
        #: Whether each account's session was alive at the last poll (for maintain()).
        self._session_alive: dict[str, bool] = {}
        container = config.container
        self.container: ContainerSpec | None = (
            ContainerSpec(container.runtime, container.image, container.binds)
            if container.runtime != "none" else None
        )

    def _user_of(self, account: Account) -> str | None:
        """The account's own login user with ssh.user "{account}", else None (the shared ssh.user)."""
        return account.id if self.hosts.per_account else None

    def _where(self, account: Account) -> str:
        return login_key(account.vnc_host, self._user_of(account))

    def _passwords(self, account: Account) -> str:
        """What ``vncpasswd -f`` reads on the host's stdin: the full password, then the current view-only one."""
        return vncpasswd_input(account.password, view_only_password(self.state_dir, account.id)).decode()

    # -- the Backend contract ------------------------------------------------------------------

    async def open(self, accounts: Sequence[Account]) -> None:
        """Check the key can be read; connections are opened when each host is first used."""
        self.hosts.load_key()
        for account in accounts:
            self.hosts.link(self._where(account))

    async def close(self, *, final: bool) -> None:
        await self.hosts.close()

    def _paths(self, info: HostInfo, account: Account) -> dict[str, str]:
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
                account=account.id, user=self.hosts.username(self._where(account)) or account.id, state_dir=base),
        }

    async def start(self, account: Account) -> DesktopState:
        host = self._where(account)  # the login: the account's own user on its host, or the shared user
        info = await self.hosts.host_info(host)
        paths = self._paths(info, account)
        result = await self.hosts.exec(
            host, script("write-password", self.settings.vncpasswd, paths["password"], paths["xauthority"],
                          paths["workspace"],
                          paths["runtime"]),
            input=self._passwords(account),
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
        log.info("desktop started account=%s host=%s display=:%d listen=%s vncport=%d pid=%d",
                 account.id, host, xvnc.display, self.listen_address(account, info), account.vnc_port, xvnc.pid)
        return desktop.to_state()

    async def _launch(self, host: str, argv: Sequence[str], *, log_file: str, pid_file: str,
                      display_file: str | None) -> LaunchReport:
        wait_s = int(DISPLAYFD_TIMEOUT_S)
        result = await self.hosts.exec(
            host, script("launch", log_file, pid_file, display_file or "-", wait_s, *argv),
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

    def listen_address(self, account: Account, info: HostInfo) -> str:
        """Where the account's Xvnc listens: ssh.interface, or with auto the host's address that the login's
        connection arrived at. The gateway connects to the desktop at the same vnchost it logged in to, so
        that is the address it reaches; it is the host's own (after any NAT on the way), which Xvnc can
        bind, unlike a name the host may resolve otherwise (Debian's 127.0.1.1 for its own name)."""
        if self.settings.interface != AUTO_INTERFACE:
            return self.settings.interface
        if info.arrived_at is None:
            raise BackendError(f"cannot tell which address of {account.vnc_host} the gateway reaches: its sshd "
                               "named none (SSH_CONNECTION); set ssh.interface to that address")
        return info.arrived_at

    async def _start_xvnc(self, account: Account, info: HostInfo, paths: Mapping[str, str]) -> LaunchReport:
        d = self.config.desktop
        argv = xvnc_argv(
            xvnc=self.settings.xvnc, displayfd=DISPLAY_FD, rfb_port=account.vnc_port,
            password_file=Path(paths["password"]), geometry=d.geometry, depth=d.depth,
            desktop_name=account.id, max_cut_text=d.max_cut_text, interface=self.listen_address(account, info),
            xauthority=Path(paths["xauthority"]),
        )
        if self.container is not None:
            argv = exec_argv(self.container, argv)
        return await self._launch(self._where(account), argv, log_file=paths["xvnc_log"],
                                  pid_file=paths["xvnc_pid"], display_file=paths["display"])

    async def _start_session(self, account: Account, info: HostInfo, paths: Mapping[str, str],
                             display: int) -> LaunchReport:
        session = list(self.settings.session or self.config.desktop.session)
        if self.container is not None:
            session = exec_argv(self.container, session)
        env = session_environment(home=paths["workspace"], runtime_dir=paths["runtime"],
                                  xauthority=paths["xauthority"], keyboard_layout=self.config.desktop.keyboard_layout,
                                  user=self.hosts.username(self._where(account)), display=f":{display}")
        # A clean environment: nothing of the SSH session's leaks into the desktop.
        argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *session]
        return await self._launch(self._where(account), argv, log_file=paths["session_log"],
                                  pid_file=paths["session_pid"], display_file=None)

    async def _abort_start(self, host: str, info: HostInfo, paths: Mapping[str, str]) -> None:
        """Undo a start that failed or was cancelled half-way: what was launched, by its pid files."""
        try:
            result = await self.hosts.exec(host, script("read-pidfiles", paths["xvnc_pid"], paths["session_pid"]))
            launched = []
            for line in result.stdout.splitlines():
                pid, _, start = line.partition(" ")
                if pid.isdigit() and start.strip().isdigit():
                    launched.append(RemoteProcess(int(pid), int(start)))
            await self.hosts.terminate(host, info.boot_id, launched, grace_s=2)
            await self.hosts.exec(host, ["rm", "-f", "--", paths["password"], paths["xauthority"], paths["xvnc_pid"],
                                    paths["session_pid"], paths["display"]])
        except BackendError as exc:
            log.error("could not clean up a failed start host=%s: %s", host, exc)

    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        desktop = SshDesktop.from_state(state)
        endpoint = Endpoint(account.vnc_host, account.vnc_port)
        try:
            report = await self.hosts.probe(desktop.where, desktop.processes())
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
        info = await self.hosts.host_info(desktop.where)
        paths = self._paths(info, account)
        await self.hosts.terminate(desktop.where, desktop.boot_id, [desktop.session], grace_s=1)
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
        info = await self.hosts.host_info(where)
        sftp = await self.hosts.sftp(where)
        return sftp, self._paths(info, account)["workspace"]

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        """A message window on the host's desktop (xmessage, detached like the session; it closes itself)."""
        desktop = SshDesktop.from_state(state)
        try:
            info = await self.hosts.host_info(desktop.where)
            paths = self._paths(info, account)
            argv = ["env", "-i", f"DISPLAY=:{desktop.display}", f"XAUTHORITY={paths['xauthority']}",
                    "PATH=/usr/local/bin:/usr/bin:/bin", "xmessage", "-center", "-timeout", str(NOTICE_SECONDS), text]
            await self._launch(desktop.where, argv, log_file=paths["session_log"],
                               pid_file=f"{info.state_dir}/run/{account.id}.notice.pid", display_file=None)
        except BackendError as exc:
            log.warning("notice not shown account=%s host=%s error=%s", account.id, desktop.host, exc)
            return
        log.info("notice shown account=%s host=%s display=:%d", account.id, desktop.host, desktop.display)

    async def refresh_passwords(self, account: Account, state: DesktopState) -> None:
        """Rewrite the password file the running Xvnc was started with (recorded in ``state``), over the login
        that started it; Xvnc reads the file at every authentication. The X cookie stays as it is."""
        desktop = SshDesktop.from_state(state)
        # An unreachable host raises HostUnreachable (a BackendError): the watcher reports it, the desktop runs on.
        result = await self.hosts.exec(
            desktop.where, script("refresh-password", self.settings.vncpasswd, desktop.password_file),
            input=self._passwords(account),
        )
        if not result.ok:
            raise BackendError(f"rewriting the VNC password file on {desktop.host} failed: {result.last_error_line()}")
        log.info("password file rewritten account=%s host=%s", account.id, desktop.host)

    async def stop(self, account: Account, state: DesktopState) -> None:
        """Stop exactly the processes start() launched (checked by identity first), remove the secret.

        Raises BackendError when the host can't be reached: the state is then kept, so a later
        `gateway down` or `gateway up` can still stop the desktop.
        """
        desktop = SshDesktop.from_state(state)
        self._session_alive.pop(account.id, None)
        try:
            await self.hosts.terminate(desktop.where, desktop.boot_id, desktop.processes(), grace_s=STOP_GRACE_S)
            await self.hosts.exec(desktop.where, ["rm", "-f", "--", desktop.password_file, *desktop.run_files])
        except HostUnreachable as exc:
            raise BackendError(f"could not stop the desktop of {account.id} on {desktop.host}: {exc}") from None
        log.info("desktop stopped account=%s host=%s", account.id, desktop.host)

