"""The embedded default: each desktop is a TigerVNC ``Xvnc`` plus a session on the gateway machine.

Each desktop runs as its account's own Unix user (see :mod:`gateway.backends.desktop_users`), under the
desktop limits, with an X cookie of its own (``-auth``): no desktop can open another's display or
read anything of the gateway.

Xvnc and the session (window manager, terminal) each lead a session and process group of their
own, so each can be stopped whole, and neither dies with the gateway. The X display number is picked by Xvnc itself
(``-displayfd``), so desktops never race each other, or another X server, for a display.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.backends.desktop import DISPLAYFD_TIMEOUT_S, NOTICE_SECONDS, session_environment, xvnc_argv
from gateway.model.config import Config
from gateway.backends.desktop_users import (DesktopUser, ensure_runtime_dir, ensure_users, kill_user_processes, launch_argv,
                             workspace_for)
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.common.proc import ProcessIdentity, is_alive, last_line, run, spawn, terminate_group
from gateway.model.tokens import Account
from gateway.model.viewonly import view_only_password, vncpasswd_input
from gateway.backends.xauth import write_xauthority
from gateway.backends.base import Backend, BackendError, DesktopState, Endpoint, PollResult, Status

__all__ = ["LocalBackend", "vnc_password_file_bytes"]

log = logging.getLogger("gateway.local")


async def vnc_password_file_bytes(password: str, *, view_only: str | None = None,
                                  vncpasswd: str = "vncpasswd") -> bytes:
    """The obfuscated password file TigerVNC reads, made by ``vncpasswd -f`` from stdin."""
    result = await run([vncpasswd, "-f"], input=vncpasswd_input(password, view_only), timeout_s=10)
    if not result.ok or len(result.stdout) < 8:
        raise BackendError(f"vncpasswd -f failed (status {result.returncode})")
    return result.stdout


@dataclass(frozen=True, slots=True)
class DesktopFiles:
    """Where one desktop's password file, X cookie and XDG_RUNTIME_DIR are."""

    password_file: Path
    xauthority: Path
    runtime_dir: Path


@dataclass(frozen=True, slots=True)
class LocalDesktop:
    xvnc: ProcessIdentity
    display: int
    password_file: str
    session: ProcessIdentity | None
    #: None: the desktop runs as the gateway's user (desktop.users: gateway).
    user: DesktopUser | None = None
    xauthority: str | None = None

    def to_state(self) -> DesktopState:
        return {
            "xvnc": self.xvnc.to_json(),
            "display": self.display,
            "password_file": self.password_file,
            "session": self.session.to_json() if self.session else None,
            "user": self.user.to_json() if self.user else None,
            "xauthority": self.xauthority,
        }

    @classmethod
    def from_state(cls, state: DesktopState) -> "LocalDesktop":
        session, user = state.get("session"), state.get("user")
        return cls(
            ProcessIdentity.from_json(state["xvnc"]),
            int(state["display"]),
            str(state["password_file"]),
            ProcessIdentity.from_json(session) if session else None,
            DesktopUser.from_json(user) if user else None,
            state.get("xauthority"),
        )

    def with_session(self, session: ProcessIdentity) -> "LocalDesktop":
        return LocalDesktop(self.xvnc, self.display, self.password_file, session, self.user, self.xauthority)


#: Where X servers put their Unix sockets (shared by every desktop of the machine).
X11_SOCKET_DIR = Path("/tmp/.X11-unix")


def ensure_x11_socket_dir(path: Path = X11_SOCKET_DIR) -> None:
    """The X servers' socket directory, root's and sticky, before the first desktop starts.

    Otherwise the first Xvnc makes it, owned by that participant, who could then delete the other
    desktops' sockets (the owner of a sticky directory may remove any entry in it).
    """
    try:
        os.mkdir(path, 0o1777)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BackendError(f"cannot create {path}: {exc.strerror}") from None
    info = os.lstat(path)
    if os.geteuid() != 0:
        return  # desktops as other users need root; without it there is nothing to hand over
    if not stat.S_ISDIR(info.st_mode):
        raise BackendError(f"{path} is not a directory; remove it (X servers put their sockets there)")
    if info.st_uid != 0 or stat.S_IMODE(info.st_mode) != 0o1777:
        log.warning("%s belonged to uid %d (mode %04o): handing it to root, mode 1777", path, info.st_uid,
                    stat.S_IMODE(info.st_mode))
        os.chown(path, 0, 0, follow_symlinks=False)
    os.chmod(path, 0o1777)  # mkdir's mode is cut by the umask


class LocalBackend(Backend):
    name = "local"

    def __init__(self, config: Config, state_dir: Path, *, xvnc: str = "Xvnc", vncpasswd: str = "vncpasswd") -> None:
        self.config = config
        self.state_dir = state_dir
        self.secrets_dir = state_dir / "secrets"
        self.logs_dir = state_dir / "logs"
        self.xvnc = xvnc
        self.vncpasswd = vncpasswd
        # Our own children, so that they are reaped; adopted desktops are watched through /proc.
        self._children: dict[int, asyncio.subprocess.Process] = {}
        #: Each account's Unix user (empty when desktops run as the gateway's user); made by open().
        self.users: dict[str, DesktopUser] = {}
        #: Message windows shown by notify(); each exits by itself after NOTICE_SECONDS.
        self._notices: list[asyncio.subprocess.Process] = []

    async def open(self, accounts: Sequence[Account]) -> None:
        self.users = await ensure_users(accounts, self.config, self.state_dir)
        if self.users:
            ensure_x11_socket_dir()


    def workspace(self, account: Account) -> Path:
        user = self.users.get(account.id)
        if user is not None:
            return Path(user.home)
        return Path(workspace_for(account.id, None, self.config, self.state_dir, None))

    def _files(self, account: Account, user: DesktopUser | None) -> DesktopFiles:
        if user is None:  # the gateway's own user: its private state dir
            runtime_dir = ensure_private_dir(self.state_dir / "run" / account.id)
            return DesktopFiles(ensure_private_dir(self.secrets_dir) / f"{account.id}.vncpasswd",
                                runtime_dir / "Xauthority", runtime_dir)
        xdg = ensure_runtime_dir(user)
        return DesktopFiles(xdg.parent / "vncpasswd", xdg.parent / "Xauthority", xdg)

    async def start(self, account: Account) -> DesktopState:
        user = self.users.get(account.id)
        files = self._files(account, user)
        owner = (user.uid, user.gid) if user else None
        await self.write_password_file(account, files.password_file, owner)
        write_xauthority(files.xauthority, owner=owner)
        xvnc_proc, xvnc_id, display = await self._start_xvnc(account, user, files)
        desktop = LocalDesktop(xvnc_id, display, str(files.password_file), None, user, str(files.xauthority))
        try:
            desktop = desktop.with_session(await self._start_session(account, desktop))
        except BaseException:
            await terminate_group(xvnc_id, proc=xvnc_proc, grace_s=2)
            raise
        log.info("desktop started account=%s user=%s display=:%d vncport=%d pid=%d", account.id,
                 user.name if user else "(gateway)", display, account.vnc_port, xvnc_id.pid)
        return desktop.to_state()

    async def write_password_file(self, account: Account, path: Path, owner: tuple[int, int] | None) -> None:
        """The account's password and its current view-only password, as TigerVNC reads them.

        Xvnc reads the file at every authentication, so rewriting it changes the passwords of a running
        desktop (a revoked share link's view-only password stops working at once).
        """
        view_only = view_only_password(self.state_dir, account.id)
        file_bytes = await vnc_password_file_bytes(account.password, view_only=view_only, vncpasswd=self.vncpasswd)
        # Unchanged on a restart (vncpasswd's output is deterministic): not rewriting it lets a
        # desktop come back even when the state dir's disk is full.
        current = path.stat() if path.exists() else None
        if current is None or path.read_bytes() != file_bytes or (owner and current.st_uid != owner[0]):
            atomic_write(path, file_bytes, mode=0o600, owner=owner)

    async def refresh_passwords(self, account: Account, state: DesktopState) -> None:
        desktop = LocalDesktop.from_state(state)
        owner = (desktop.user.uid, desktop.user.gid) if desktop.user else None
        await self.write_password_file(account, Path(desktop.password_file), owner)
        log.info("password file rewritten account=%s", account.id)

    async def _start_xvnc(self, account: Account, user: DesktopUser | None,
                          files: DesktopFiles) -> tuple[asyncio.subprocess.Process, ProcessIdentity, int]:
        read_fd, write_fd = os.pipe()
        try:
            argv = xvnc_argv(
                xvnc=self.xvnc, displayfd=write_fd, rfb_port=account.vnc_port, password_file=files.password_file,
                geometry=self.config.desktop.geometry, depth=self.config.desktop.depth,
                desktop_name=account.id, max_cut_text=self.config.desktop.max_cut_text,
                xauthority=files.xauthority,
            )
            proc, identity = await spawn(launch_argv(argv, user, self.config.desktop.limits),
                                         env=self._environment(account, user, files, display=None),
                                         cwd="/", log_path=self.logs_dir / f"{account.id}.xvnc.log",
                                         pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._children[proc.pid] = proc
        try:
            display = await _read_display(read_fd, proc)
        except BaseException as exc:
            await self._forget_child(identity, proc)
            if isinstance(exc, BackendError):
                raise BackendError(f"Xvnc did not start on port {account.vnc_port}: {exc} "
                                   f"(see {self.logs_dir / (account.id + '.xvnc.log')})") from None
            raise
        return proc, identity, display

    async def _forget_child(self, identity: ProcessIdentity, proc: asyncio.subprocess.Process) -> None:
        await terminate_group(identity, proc=proc, grace_s=2)
        self._children.pop(proc.pid, None)

    def _environment(self, account: Account, user: DesktopUser | None, files: DesktopFiles,
                     display: int | None) -> dict[str, str]:
        return session_environment(home=str(self.workspace(account)), runtime_dir=str(files.runtime_dir),
                                   xauthority=str(files.xauthority), keyboard_layout=self.config.desktop.keyboard_layout,
                                   user=user.name if user else pwd.getpwuid(os.geteuid()).pw_name,
                                   display=f":{display}" if display is not None else None)

    def _desktop_files(self, account: Account, desktop: LocalDesktop) -> DesktopFiles:
        if desktop.xauthority is None:  # recorded by a version without X cookies
            return self._files(account, desktop.user)
        xauthority = Path(desktop.xauthority)
        runtime_dir = xauthority.parent / "xdg" if desktop.user else xauthority.parent
        return DesktopFiles(Path(desktop.password_file), xauthority, runtime_dir)

    async def _start_session(self, account: Account, desktop: LocalDesktop) -> ProcessIdentity:
        home = self.workspace(account)
        if desktop.user is None:
            home.mkdir(parents=True, exist_ok=True)
        env = self._environment(account, desktop.user, self._desktop_files(account, desktop), desktop.display)
        proc, identity = await spawn(
            launch_argv(self.config.desktop.session, desktop.user, self.config.desktop.limits),
            env=env, cwd=home if home.is_dir() else "/",
            log_path=self.logs_dir / f"{account.id}.session.log",
        )
        self._children[proc.pid] = proc
        return identity

    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        desktop = LocalDesktop.from_state(state)
        endpoint = Endpoint("127.0.0.1", account.vnc_port)
        if not is_alive(desktop.xvnc):
            self._reap(desktop.xvnc.pid)
            return PollResult(Status.GONE, endpoint, "the X server exited")
        return PollResult(Status.RUNNING, endpoint)

    async def maintain(self, account: Account, state: DesktopState) -> DesktopState | None:
        """If the window manager session ended but the X server runs, start a new session."""
        desktop = LocalDesktop.from_state(state)
        if desktop.session is None or is_alive(desktop.session) or not is_alive(desktop.xvnc):
            return None
        self._reap(desktop.session.pid)
        await terminate_group(desktop.session, grace_s=1)  # what is left of the old session's group
        session = await self._start_session(account, desktop)
        log.warning("session restarted account=%s display=:%d", account.id, desktop.display)
        return desktop.with_session(session).to_state()

    async def set_keyboard_layout(self, account: Account, state: DesktopState, layout: str) -> None:
        desktop = LocalDesktop.from_state(state)
        env = {"PATH": "/usr/bin:/bin", **_xauthority_env(desktop)}
        result = await run(["setxkbmap", "-display", f":{desktop.display}", "-layout", layout], timeout_s=10, env=env)
        if not result.ok:
            raise BackendError(f"setxkbmap refused {layout!r}: {last_line(result.stderr) or result.returncode}")
        log.info("keyboard layout set account=%s layout=%s", account.id, layout)

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        """A small window in the middle of the desktop (xmessage); it closes itself after a while."""
        desktop = LocalDesktop.from_state(state)
        xmessage = shutil.which("xmessage")
        if xmessage is None:
            log.warning("notice not shown, xmessage is not installed account=%s", account.id)
            return
        # Earlier notices that closed by now are reaped; a notice's process never outlives its X server.
        self._notices = [proc for proc in self._notices if proc.returncode is None]
        env = {"DISPLAY": f":{desktop.display}", "PATH": "/usr/bin:/bin", **_xauthority_env(desktop)}
        argv = [xmessage, "-center", "-timeout", str(NOTICE_SECONDS), text]
        try:
            proc, _ = await spawn(launch_argv(argv, desktop.user, self.config.desktop.limits), env=env, cwd="/",
                                  log_path=self.logs_dir / f"{account.id}.session.log")
        except OSError as exc:
            log.warning("notice not shown account=%s error=%s", account.id, exc)
            return
        self._notices.append(proc)
        log.info("notice shown account=%s display=:%d", account.id, desktop.display)

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None and proc.returncode is not None:
            del self._children[pid]

    async def stop(self, account: Account, state: DesktopState) -> None:
        desktop = LocalDesktop.from_state(state)
        stopping = [terminate_group(desktop.xvnc, proc=self._children.pop(desktop.xvnc.pid, None), grace_s=5)]
        if desktop.session is not None:
            stopping.append(terminate_group(desktop.session, proc=self._children.pop(desktop.session.pid, None),
                                            grace_s=5))
        await asyncio.gather(*stopping)
        if desktop.user is not None and desktop.user.owned:
            # Whatever the participant left running (nohup, setsid) belongs to the desktop too.
            await kill_user_processes(desktop.user.uid)
        for path in (desktop.password_file, desktop.xauthority):
            with contextlib.suppress(FileNotFoundError, TypeError):
                Path(path).unlink()  # type: ignore[arg-type]
        log.info("desktop stopped account=%s", account.id)


def _xauthority_env(desktop: LocalDesktop) -> dict[str, str]:
    return {"XAUTHORITY": desktop.xauthority} if desktop.xauthority else {}


async def _read_display(read_fd: int, proc: asyncio.subprocess.Process) -> int:
    """Wait for Xvnc to write its display number to the -displayfd pipe (it does once it listens)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    try:
        async with asyncio.timeout(DISPLAYFD_TIMEOUT_S):
            line = await reader.readline()
    except TimeoutError:
        raise BackendError(f"no display number within {DISPLAYFD_TIMEOUT_S:g} s") from None
    finally:
        transport.close()
    text = line.decode(errors="replace").strip()
    if not text.isdigit():
        with contextlib.suppress(TimeoutError):  # let the exit status arrive, it says more than an empty pipe
            await asyncio.wait_for(proc.wait(), 0.5)
        status = proc.returncode
        raise BackendError("it exited" + (f" with status {status}" if status is not None else ""))
    return int(text)

