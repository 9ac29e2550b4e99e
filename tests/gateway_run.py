"""Run a real `gateway up` in a subprocess for tests, and check that it leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.backends import backends_with_leftovers
from gateway.backends.desktop_users import DesktopUser, recorded_users
from gateway.common import rfb
from gateway.model.state import DesktopRecord, StateStore
from gateway.model.tokens import Account, format_tokens, generate_password
from tests.system import free_port, free_ports, require_program

__all__ = ["GatewayRun", "make_accounts", "processes_mentioning", "port_is_listening", "handshake_until_ok",
           "recorded_desktops", "display_env", "running_gateway"]


def make_accounts(count: int, prefix: str = "ws") -> list[Account]:
    """Accounts on free ports of this machine, with random passwords."""
    ports = iter(free_ports(2 * count))
    accounts = []
    for i in range(1, count + 1):
        name = f"{prefix}{i:02d}"
        accounts.append(Account(name, "localhost", f"/desktop/{name}", next(ports), next(ports), generate_password(), i))
    return accounts


def processes_mentioning(text: str) -> list[int]:
    """Pids of processes whose command line or environment contains ``text`` (e.g. a state dir).

    When ``text`` is a state dir, the processes of the Unix users that event made for its desktops
    count too: a desktop's processes run as its user and name nothing of the gateway's state.
    """
    needle = text.encode()
    uids = {user.uid for user in recorded_users(Path(text)).values()} if Path(text).is_dir() else set()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes()
                    or (uids and _live_uid(entry) in uids)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _live_uid(proc_dir: Path) -> int | None:
    """The real uid of a process that is not a zombie, else None."""
    status = (proc_dir / "status").read_text()
    if "State:\tZ" in status:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def display_env(state_dir: Path, account_id: str) -> dict[str, str]:
    """The environment an X client (xdotool, xclip, xterm...) of this test needs to open the account's
    local display: DISPLAY, and XAUTHORITY with the desktop's cookie (Xvnc runs with -auth)."""
    state = recorded_desktops(state_dir)[account_id].state
    env = {**os.environ, "DISPLAY": f":{state['display']}"}
    if state.get("xauthority"):
        env["XAUTHORITY"] = state["xauthority"]
    return env


def unique_user_prefix() -> str:
    """A user_prefix no other test (or test run beside this one) uses: created users never collide."""
    return f"t{secrets.token_hex(3)}-"


def with_user_prefix(config_text: str, prefix: str) -> str:
    """``config_text`` with ``desktop.user_prefix`` set, unless the test set one itself."""
    if "user_prefix" in config_text:
        return config_text
    lines = config_text.splitlines()
    if "desktop:" in lines:
        lines.insert(lines.index("desktop:") + 1, f"  user_prefix: {prefix}")
        return "\n".join(lines) + "\n"
    return config_text + ("" if not config_text or config_text.endswith("\n") else "\n") + \
        f"desktop:\n  user_prefix: {prefix}\n"


async def handshake_until_ok(url: str, password: str, timeout_s: float = 30) -> rfb.RfbSession:
    """Retry a full RFB handshake through the gateway until it succeeds (a restarted proxy, desktop
    or Apache takes a moment); a wrong password fails at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await rfb.connect_websocket(url, password, timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - aiohttp errors of various kinds while things restart
            if isinstance(exc, rfb.RfbAuthFailed) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def recorded_desktops(state_dir: Path) -> dict[str, DesktopRecord]:
    """The desktops a gateway recorded in its state database."""
    store = StateStore(state_dir / "gateway.db")
    try:
        return store.desktops()
    finally:
        store.close()


def port_is_listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class GatewayRun:
    """One `gateway up` subprocess with its own token file, state dir and ports."""

    tmp: Path
    accounts: list[Account]
    config_text: str = ""
    listen_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.tokens = self.tmp / "tokens.txt"
        self.tokens.write_text(format_tokens(self.accounts))
        self.tokens.chmod(0o600)
        self.state_dir = self.tmp / "state"
        self.config = self.tmp / "gateway.yaml"
        self.config_text = with_user_prefix(self.config_text, unique_user_prefix())
        self.config.write_text(self.config_text)
        self.output = self.tmp / "gateway.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}/"

    def ws_url(self, account: Account) -> str:
        return f"ws://127.0.0.1:{self.listen_port}{account.websocket_path}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "gateway", "up", str(self.tokens), "--config", str(self.config),
                "--listen", f"127.0.0.1:{self.listen_port}", "--state-dir", str(self.state_dir)]

    def start(self) -> None:
        out = open(self.output, "ab")
        self.process = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_ready(self, timeout_s: float = 30) -> float:
        """Wait for the 'Landing page:' announcement; returns the seconds it took."""
        assert self.process is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.text().count("Landing page:") > self.announcements_before:
                return time.monotonic() - started
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}:\n{self.text()}")
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready within {timeout_s} s:\n{self.text()}")

    announcements_before: int = 0

    def up(self, timeout_s: float = 30) -> float:
        self.announcements_before = self.text().count("Landing page:")
        self.start()
        return self.wait_ready(timeout_s)

    def status(self) -> dict[str, dict]:
        """`gateway status --json` of this run, by account."""
        result = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "--state-dir", str(self.state_dir)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return {row["account"]: row for row in json.loads(result.stdout)["desktops"]}

    def users(self) -> dict[str, DesktopUser]:
        """The Unix user each local desktop of this run runs as, by account."""
        return recorded_users(self.state_dir)

    def workspace(self, account: Account) -> Path:
        """The account's HOME: its user's home (created users), else the state dir's workspace."""
        user = self.users().get(account.id)
        return Path(user.home) if user else self.state_dir / "workspaces" / account.id

    def terminate(self, timeout_s: float = 10) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=timeout_s)
        return status

    def kill_everything(self) -> None:
        """Last-resort cleanup (a test failed half-way): kill the gateway, then stop what it recorded as
        `gateway down` does after a crash (websockify's command line doesn't name the state dir), then
        kill whatever still mentions the state dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if (self.state_dir / "gateway.db").exists() and not self.stopped_cleanly():
            subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(self.state_dir),
                            "--config", str(self.config)], capture_output=True, timeout=120)
        for pid in processes_mentioning(str(self.state_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.users():  # the users made for this run's desktops, their homes and processes
            self.remove_users(self.state_dir)

    def stopped_cleanly(self) -> bool:
        """The gateway exited by itself with status 0 and its records name nothing left to stop, so that
        `gateway down` would do nothing (each such `down` costs a Python start; there are hundreds)."""
        if self.process is None or self.process.returncode != 0:
            return False
        store = StateStore(self.state_dir / "gateway.db")
        try:
            recorded = bool(store.services() or store.desktops())
        finally:
            store.close()
        return not recorded and not backends_with_leftovers(self.state_dir)

    @staticmethod
    def remove_users(state_dir: Path) -> None:
        """`gateway users remove --delete-homes`: the event's users, their processes and homes go."""
        subprocess.run([sys.executable, "-m", "gateway", "users", "remove", "--state-dir", str(state_dir),
                        "--delete-homes"], capture_output=True, timeout=120)


@contextlib.contextmanager
def running_gateway(directory: Path, count: int, config_text: str = "",
                    files: dict[str, str] | None = None, accounts: list[Account] | None = None) -> Iterator[GatewayRun]:
    """A `gateway up` of ``count`` accounts (or of ``accounts``) for a whole test module: it must stop
    cleanly at the end, and whatever happens, nothing it started is left. ``files`` are written beside
    the config first."""
    for program in ("Xvnc", "vncpasswd", "apache2", "openbox", "xterm"):
        require_program(program)
    gateway = GatewayRun(directory, accounts if accounts is not None else make_accounts(count), config_text)
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    try:
        gateway.up()
        yield gateway
        assert gateway.terminate() == 0
    finally:
        gateway.kill_everything()
