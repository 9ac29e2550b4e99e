"""Time to ready, gateway memory and proxy restart, measured on real `gateway up` runs with local Xvnc desktops.

Run as root, `gateway up` makes a Unix user per desktop; each run uses a user prefix of its own and
removes its users and their homes when it ends (`gateway users remove --delete-homes`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from gateway.common import rfb
from gateway.model.state import StateStore
from gateway.model.tokens import Account, format_tokens, generate_password
from tests.system import free_ports

from .common import cmdline, descendants, percentile, pss_mb

__all__ = ["GatewayUp"]

MODE_CONFIG = {
    "per-account": "",
    "shared": "proxy:\n  mode: shared\n",
    "builtin": "proxy:\n  mode: builtin\n",
}


class GatewayUp:
    """One real `gateway up` subprocess with N local desktops, its own ports and state dir."""

    def __init__(self, count: int, mode: str, *, concurrency: int | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-{count}-"))
        ports = iter(free_ports(2 * count + 1))  # distinct: bound all at once
        self.accounts = [Account(f"b{i:03d}", "localhost", f"/desktop/b{i:03d}", next(ports), next(ports),
                                 generate_password(), i) for i in range(1, count + 1)]
        self.tokens = self.tmp / "tokens.txt"
        self.tokens.write_text(format_tokens(self.accounts))
        self.tokens.chmod(0o600)
        config = MODE_CONFIG[mode]
        # A prefix of this run's own: users made for its desktops never collide with a test's or another run's.
        config += f"desktop:\n  user_prefix: b{secrets.token_hex(3)}-\n"
        if concurrency is not None:
            config += f"  start_concurrency: {concurrency}\n"
        (self.tmp / "gateway.yaml").write_text(config)
        self.port = next(ports)
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, account: Account) -> str:
        return f"ws://127.0.0.1:{self.port}{account.websocket_path}"

    async def start_and_wait_ready(self, timeout_s: float) -> dict[str, object]:
        """Start `gateway up`; return when every desktop completed an RFB handshake through Apache."""
        argv = [sys.executable, "-m", "gateway", "up", str(self.tokens), "--config", str(self.tmp / "gateway.yaml"),
                "--listen", f"127.0.0.1:{self.port}", "--state-dir", str(self.tmp / "state")]
        started = time.monotonic()
        with open(self.tmp / "gateway.out", "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ready_at: dict[str, float] = {}
        deadline = started + timeout_s
        # Poll the status API (one cheap request), then prove each desktop that says ready with a
        # real handshake through Apache: a few requests per desktop instead of a storm of retries.
        async with aiohttp.ClientSession() as http:
            async def prove(account: Account) -> None:
                while time.monotonic() < deadline:
                    try:
                        await rfb.connect_websocket(self.url(account), account.password, timeout_s=5)
                        ready_at[account.id] = time.monotonic() - started
                        return
                    except (OSError, rfb.RfbError, aiohttp.ClientError, TimeoutError):
                        await asyncio.sleep(0.1)

            proving: dict[str, asyncio.Task[None]] = {}
            while len(ready_at) < len(self.accounts) and time.monotonic() < deadline:
                if self.process.poll() is not None:
                    tail = (self.tmp / "gateway.out").read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"gateway exited {self.process.returncode}: " + " | ".join(tail))
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/api/desktops", timeout=aiohttp.ClientTimeout(total=5)) as r:
                        states = {d["account"]: d["state"] for d in (await r.json())["desktops"]}
                except (OSError, aiohttp.ClientError, TimeoutError, ValueError):
                    states = {}
                for account in self.accounts:
                    if states.get(account.id) == "ready" and account.id not in proving:
                        proving[account.id] = asyncio.ensure_future(prove(account))
                await asyncio.sleep(0.1)
            await asyncio.gather(*proving.values())
        times = sorted(ready_at.values())
        return {
            "seconds": round(max(times), 2) if len(times) == len(self.accounts) else None,
            "ready": len(times),
            "desktop_p50_s": _round(percentile(times, 50)),
            "desktop_p99_s": _round(percentile(times, 99)),
        }

    def gateway_pids(self) -> dict[str, list[int]]:
        """The gateway's own processes on this host, by role; desktops (Xvnc, session) left out."""
        assert self.process is not None
        roles: dict[str, list[int]] = {"supervisor": [self.process.pid], "proxies": [], "apache": []}
        for pid in descendants(self.process.pid)[1:]:
            line = cmdline(pid)
            if b"websockify" in line:
                roles["proxies"].append(pid)
            elif b"apache2" in line:
                roles["apache"].append(pid)
        return roles

    def memory_mb(self) -> dict[str, float]:
        roles = self.gateway_pids()
        result = {role: round(pss_mb(pids), 1) for role, pids in roles.items()}
        result["total"] = round(sum(result.values()), 1)
        return result

    async def hold_connections(self, settle_s: float = 2.0) -> tuple[dict[str, float], int]:
        """Open one viewer per desktop (full RFB handshake), measure memory, close them."""
        held: list[aiohttp.ClientWebSocketResponse] = []
        failed = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def open_one(account: Account) -> None:
                nonlocal failed
                try:
                    async with asyncio.timeout(30):
                        ws = await http.ws_connect(self.url(account), protocols=("binary",))
                        stream = rfb.WebSocketStream(ws)
                        await rfb.handshake(stream, stream, account.password)
                        held.append(ws)
                except (OSError, rfb.RfbError, aiohttp.ClientError, TimeoutError):
                    failed += 1

            await asyncio.gather(*(open_one(a) for a in self.accounts))
            await asyncio.sleep(settle_s)
            memory = self.memory_mb()
            for ws in held:
                await ws.close()
        return memory, failed

    async def proxy_restart_s(self, account: Account, timeout_s: float = 30) -> float | None:
        """SIGKILL the account's proxy; seconds until a full RFB handshake through Apache works again."""
        store = StateStore(self.tmp / "state" / "gateway.db")
        try:
            proxy = store.services().get(f"proxy:{account.id}")
        finally:
            store.close()
        if proxy is None:
            return None
        os.kill(proxy.pid, signal.SIGKILL)
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                await rfb.connect_websocket(self.url(account), account.password, timeout_s=5)
                return round(time.monotonic() - started, 2)
            except (OSError, rfb.RfbError, aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.05)
        return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if os.geteuid() == 0 and (self.tmp / "state").is_dir():  # the Unix users made for the desktops, and their homes
            subprocess.run([sys.executable, "-m", "gateway", "users", "remove", "--state-dir", str(self.tmp / "state"),
                            "--delete-homes"], capture_output=True, timeout=120)
        shutil.rmtree(self.tmp, ignore_errors=True)  # token file, state dir, logs


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def measure_gateway(count: int, mode: str, *, concurrency: int | None = None, memory: bool,
                          timeout_s: float, restarts: int = 0) -> dict[str, object]:
    run = GatewayUp(count, mode, concurrency=concurrency)
    try:
        result: dict[str, object] = {"ready": await run.start_and_wait_ready(timeout_s)}
        if restarts:  # a few accounts' proxies killed in turn, each timed until it answers again
            result["restart_s"] = [await run.proxy_restart_s(a) for a in run.accounts[:restarts]]
        if memory:
            await asyncio.sleep(2)  # let start-up garbage settle
            idle = run.memory_mb()
            connected, failed = await run.hold_connections()
            result["memory"] = {
                "idle_mb_per_account": round(idle["total"] / count, 2),
                "connected_mb_per_account": round(connected["total"] / count, 2),
                "idle_total_mb": idle, "connected_total_mb": connected, "failed_connects": failed,
            }
        return result
    finally:
        run.stop()
