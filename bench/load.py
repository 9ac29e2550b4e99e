"""Interactive latency under load through each proxy chain, and the landing page under 500 requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.system import free_ports

from .common import cpu_seconds_total, descendants, percentile, pss_mb

__all__ = ["Backends", "Chain", "run_load", "landing"]

RATE = 1_000_000  # bytes per second per session
INTERVAL_S = 0.05  # an input event every 50 ms


class Backends:
    """The synthetic VNC-like backends, one port per account, in a process of their own."""

    def __init__(self, count: int) -> None:
        self.ports = free_ports(count)
        self.process = subprocess.Popen([sys.executable, "-m", "bench.synthetic", "serve", str(RATE), *map(str, self.ports)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("synthetic backends did not start")

    def close(self) -> None:
        _close(self.process)


class Chain:
    """The gateway's proxy chain (bench.chain) for one proxy mode, in front of the backends."""

    def __init__(self, mode: str, backend_ports: list[int]) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=f"bench-chain-{mode}-"))
        apache_port, *ws_ports = free_ports(len(backend_ports) + 1)
        spec = {"mode": mode, "work": str(self.work), "apache_port": apache_port,
                "accounts": [{"id": f"s{i:03d}", "path": f"/desktop/s{i:03d}", "ws_port": ws_port,
                              "backend_port": port}
                             for i, (port, ws_port) in enumerate(zip(backend_ports, ws_ports), 1)]}
        (self.work / "spec.json").write_text(json.dumps(spec))
        self.log = open(self.work / "chain.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "bench.chain", str(self.work / "spec.json")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"proxy chain {mode} did not start; see {self.work}/chain.log")
        self.info = json.loads(line)
        self.ids = [a["id"] for a in spec["accounts"]]

    def urls(self, count: int, via: str) -> list[str]:
        return [self.info["urls"][i][via] for i in self.ids[:count]]

    def pids(self) -> list[int]:
        return descendants(self.process.pid)

    def close(self) -> None:
        _close(self.process)
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def _close(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        assert process.stdin is not None
        process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_load(urls: list[str], *, duration_s: float, chain: Chain | None) -> dict[str, object]:
    """N sessions at once for ``duration_s``: RTT percentiles, failures, and the chain's CPU and memory."""
    spec = Path(tempfile.mktemp(prefix="bench-load-", suffix=".json"))
    spec.write_text(json.dumps({"urls": urls, "interval": INTERVAL_S, "duration": duration_s,
                                "connect_timeout": 30}))
    before = cpu_seconds_total(chain.pids()) if chain else {}
    client = subprocess.Popen([sys.executable, "-m", "bench.synthetic", "load", str(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    memory = None
    if chain is not None:  # memory with every session connected, halfway through
        time.sleep(min(duration_s / 2 + 1, duration_s))
        memory = round(pss_mb(chain.pids()), 1)
    try:
        out, err = client.communicate(timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
    spec.unlink(missing_ok=True)
    after = cpu_seconds_total(chain.pids()) if chain else {}
    if client.returncode != 0:
        raise RuntimeError(f"load client failed: {err.decode(errors='replace')[-2000:]}")
    result = json.loads(out)
    rtts = result["rtts_ms"]
    summary: dict[str, object] = {
        "p50_ms": _r(percentile(rtts, 50)), "p99_ms": _r(percentile(rtts, 99)),
        "failed": result["failed"], "lost_events": result["lost_events"], "samples": len(rtts),
        "received_mb_per_s": round(result["received_mb"] / duration_s, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if chain is not None:
        summary["gateway_cpu_s"] = round(sum(after.get(p, 0) - before.get(p, 0) for p in after), 2)
        summary["gateway_pss_mb"] = memory
    return summary


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def landing(base_url: str, paths: list[str], *, concurrent: int) -> dict[str, object]:
    """``concurrent`` requests at once, cycling through ``paths``: latency percentiles and errors."""
    latencies: list[float] = []
    errors = 0

    async def one(http: aiohttp.ClientSession, path: str) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            async with http.get(base_url + path) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    return
        except (OSError, aiohttp.ClientError, TimeoutError):
            errors += 1
            return
        latencies.append((time.perf_counter() - started) * 1000)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http, paths[i % len(paths)]) for i in range(concurrent)))
        wall = time.perf_counter() - started
    return {"requests": concurrent, "p50_ms": _r(percentile(latencies, 50)), "p99_ms": _r(percentile(latencies, 99)),
            "errors": errors, "wall_s": round(wall, 2)}
