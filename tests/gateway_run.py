"""Run a real `gateway up` in a subprocess for tests, and check that it leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway import rfb
from gateway.state import DesktopRecord, StateStore
from gateway.tokens import Account, format_tokens, generate_password
from tests.system import free_port, free_ports

__all__ = ["GatewayRun", "make_accounts", "processes_mentioning", "port_is_listening", "handshake_until_ok",
           "recorded_desktops"]


def make_accounts(count: int, prefix: str = "ws") -> list[Account]:
    """Accounts on free ports of this machine, with random passwords."""
    ports = iter(free_ports(2 * count))
    accounts = []
    for i in range(1, count + 1):
        name = f"{prefix}{i:02d}"
        accounts.append(Account(name, "localhost", f"/desktop/{name}", next(ports), next(ports), generate_password(), i))
    return accounts


def processes_mentioning(text: str) -> list[int]:
    """Pids of processes whose command line or environment contains ``text`` (e.g. a state dir)."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


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
        if (self.state_dir / "gateway.db").exists():
            subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(self.state_dir),
                            "--config", str(self.config)], capture_output=True, timeout=120)
        for pid in processes_mentioning(str(self.state_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
