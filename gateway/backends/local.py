"""The embedded default: each desktop is a TigerVNC ``Xvnc`` plus a session on the gateway machine.

Xvnc and the session (window manager, terminal) each lead a session and process group of their
own, so each can be stopped whole, and neither dies with the gateway. The X display number is picked by Xvnc itself
(``-displayfd``), so desktops never race each other, or another X server, for a display.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..files import atomic_write, ensure_private_dir
from ..proc import ProcessIdentity, is_alive, run, spawn, terminate_group
from ..tokens import Account
from ..viewonly import view_only_password, vncpasswd_input
from .base import Backend, BackendError, DesktopState, Endpoint, PollResult, Status

__all__ = ["LocalBackend", "xvnc_argv", "vnc_password_file_bytes"]

log = logging.getLogger("gateway.local")

DISPLAYFD_TIMEOUT_S = 15.0
#: How long a notice (an idle warning) stays on the desktop unless closed.
NOTICE_SECONDS = 300


async def vnc_password_file_bytes(password: str, *, view_only: str | None = None,
                                  vncpasswd: str = "vncpasswd") -> bytes:
    """The obfuscated password file TigerVNC reads, made by ``vncpasswd -f`` from stdin."""
    result = await run([vncpasswd, "-f"], input=vncpasswd_input(password, view_only), timeout_s=10)
    if not result.ok or len(result.stdout) < 8:
        raise BackendError(f"vncpasswd -f failed (status {result.returncode})")
    return result.stdout


def xvnc_argv(
    *,
    xvnc: str,
    displayfd: int,
    rfb_port: int,
    password_file: Path,
    geometry: str,
    depth: int,
    desktop_name: str,
    max_cut_text: int,
    interface: str = "127.0.0.1",
) -> list[str]:
    """The Xvnc command line. The password is in a file: command lines are public."""
    return [
        xvnc,
        "-displayfd", str(displayfd),
        "-rfbport", str(rfb_port),
        "-rfbauth", str(password_file),
        "-SecurityTypes", "VncAuth",
        # Every viewer reaches Xvnc through a proxy on 127.0.0.1; TigerVNC's blacklist would lock
        # out everyone behind it after one participant's five typos.
        "-UseBlacklist=0",
        "-interface", interface,
        "-geometry", geometry,
        "-depth", str(depth),
        "-desktop", desktop_name,
        "-AlwaysShared",
        "-SendCutText=1",
        "-AcceptCutText=1",
        f"-MaxCutText={max_cut_text}",
        "-nolisten", "tcp",
    ]


@dataclass(frozen=True, slots=True)
class LocalDesktop:
    xvnc: ProcessIdentity
    display: int
    password_file: str
    session: ProcessIdentity | None

    def to_state(self) -> DesktopState:
        return {
            "xvnc": self.xvnc.to_json(),
            "display": self.display,
            "password_file": self.password_file,
            "session": self.session.to_json() if self.session else None,
        }

    @classmethod
    def from_state(cls, state: DesktopState) -> "LocalDesktop":
        session = state.get("session")
        return cls(
            ProcessIdentity.from_json(state["xvnc"]),
            int(state["display"]),
            str(state["password_file"]),
            ProcessIdentity.from_json(session) if session else None,
        )


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
        #: Message windows shown by notify(); each exits by itself after NOTICE_SECONDS.
        self._notices: list[asyncio.subprocess.Process] = []

    def workspace(self, account: Account) -> Path:
        return Path(self.config.desktop.workspace.format(account=account.id, state_dir=self.state_dir))

    async def start(self, account: Account) -> DesktopState:
        ensure_private_dir(self.secrets_dir)
        password_file = self.secrets_dir / f"{account.id}.vncpasswd"
        view_only = view_only_password(self.state_dir, account.id)
        file_bytes = await vnc_password_file_bytes(account.password, view_only=view_only, vncpasswd=self.vncpasswd)
        # Unchanged on a restart (vncpasswd's output is deterministic): not rewriting it lets a
        # desktop come back even when the state dir's disk is full.
        if not password_file.exists() or password_file.read_bytes() != file_bytes:
            atomic_write(password_file, file_bytes, mode=0o600)
        xvnc_proc, xvnc_id, display = await self._start_xvnc(account, password_file)
        try:
            session = await self._start_session(account, display)
        except BaseException:
            await terminate_group(xvnc_id, proc=xvnc_proc, grace_s=2)
            raise
        desktop = LocalDesktop(xvnc_id, display, str(password_file), session)
        log.info("desktop started account=%s display=:%d vncport=%d pid=%d",
                 account.id, display, account.vnc_port, xvnc_id.pid)
        return desktop.to_state()

    async def _start_xvnc(self, account: Account, password_file: Path) -> tuple[asyncio.subprocess.Process, ProcessIdentity, int]:
        read_fd, write_fd = os.pipe()
        try:
            argv = xvnc_argv(
                xvnc=self.xvnc, displayfd=write_fd, rfb_port=account.vnc_port, password_file=password_file,
                geometry=self.config.desktop.geometry, depth=self.config.desktop.depth,
                desktop_name=account.id, max_cut_text=self.config.desktop.max_cut_text,
            )
            proc, identity = await spawn(argv, log_path=self.logs_dir / f"{account.id}.xvnc.log",
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

    async def _start_session(self, account: Account, display: int) -> ProcessIdentity:
        home = self.workspace(account)
        home.mkdir(parents=True, exist_ok=True)
        runtime_dir = ensure_private_dir(self.state_dir / "run" / account.id)
        env = session_environment(home, display, runtime_dir, self.config.desktop.keyboard_layout)
        proc, identity = await spawn(
            self.config.desktop.session, env=env, cwd=home,
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
        session = await self._start_session(account, desktop.display)
        log.warning("session restarted account=%s display=:%d", account.id, desktop.display)
        return LocalDesktop(desktop.xvnc, desktop.display, desktop.password_file, session).to_state()

    async def set_keyboard_layout(self, account: Account, state: DesktopState, layout: str) -> None:
        desktop = LocalDesktop.from_state(state)
        result = await run(["setxkbmap", "-display", f":{desktop.display}", "-layout", layout], timeout_s=10)
        if not result.ok:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            raise BackendError(f"setxkbmap refused {layout!r}: {detail[-1] if detail else result.returncode}")
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
        env = {"DISPLAY": f":{desktop.display}", "PATH": "/usr/bin:/bin"}
        try:
            proc, _ = await spawn([xmessage, "-center", "-timeout", str(NOTICE_SECONDS), text], env=env,
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
        with contextlib.suppress(FileNotFoundError):
            Path(desktop.password_file).unlink()
        log.info("desktop stopped account=%s", account.id)


def session_environment(home: Path, display: int, runtime_dir: Path, keyboard_layout: str) -> dict[str, str]:
    """A clean environment for the desktop session: nothing of the gateway's own leaks in."""
    env = {
        "DISPLAY": f":{display}",
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime_dir),
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "SHELL": "/bin/bash",
        "USER": os.environ.get("USER", "root"),
        "TERM": "xterm-256color",
    }
    if keyboard_layout:
        env["GATEWAY_KEYBOARD_LAYOUT"] = keyboard_layout
    return env


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
        await asyncio.sleep(0.1)  # let the exit status arrive, it says more than an empty pipe
        status = proc.returncode
        raise BackendError("it exited" + (f" with status {status}" if status is not None else ""))
    return int(text)

