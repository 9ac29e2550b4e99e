"""Interactive latency under load through each proxy chain, and the landing page under 500 requests.

Every load run is judged against references measured in the same run:

* a direct websocket baseline (the synthetic backends spoken to over websocket, no proxy), run
  before the chains of each repetition, for "p99 added";
* the reference pipe (bench.refpipe) on the gateway's core, for CPU per relayed GB.

The gateway under test (a chain's whole process tree, Apache included, or the reference pipe)
runs on :data:`GATEWAY_CPUS`, the load generator (clients and backends) on :data:`LOAD_CPUS`.
"""

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.system import free_ports

from .common import cpu_seconds_total, descendants, latency_with_losses, percentile, pss_mb

__all__ = ["Backends", "Chain", "RefPipe", "run_load", "landing", "GATEWAY_CPUS", "LOAD_CPUS"]

RATE = 1_000_000  # bytes per second per session
INTERVAL_S = 0.05  # an input event every 50 ms


def _split_cores() -> tuple[list[int], list[int]]:
    """Gateway on the first CPU, load generator on the rest (nothing pinned on a 1-CPU machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[:1], cpus[1:]) if len(cpus) >= 2 else ([], [])


GATEWAY_CPUS, LOAD_CPUS = _split_cores()


def _cpus_arg(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


class Backends:
    """The synthetic VNC-like backends, one port per account, in a process of their own (load side)."""

    def __init__(self, count: int) -> None:
        self.ws_port, *self.ports = free_ports(count + 1)
        self.process = subprocess.Popen([sys.executable, "-m", "bench.synthetic", "serve", _cpus_arg(LOAD_CPUS),
                                         str(RATE), str(self.ws_port), *map(str, self.ports)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("synthetic backends did not start")

    def direct_urls(self, count: int) -> list[str]:
        """The direct websocket baseline: the same backends, no proxy in between."""
        return [f"ws://127.0.0.1:{self.ws_port}/{p}" for p in self.ports[:count]]

    def cpu_s(self) -> float:
        return sum(cpu_seconds_total([self.process.pid]).values())

    def close(self) -> None:
        _close(self.process)


class RefPipe:
    """bench.refpipe on the gateway's core: the reference for CPU per relayed GB."""

    name = "reference pipe"

    def __init__(self, backend_ports: list[int]) -> None:
        self.backend_ports = backend_ports
        self.process = subprocess.Popen([sys.executable, "-m", "bench.refpipe", _cpus_arg(GATEWAY_CPUS)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def urls(self, count: int) -> list[str]:
        return [f"ws://127.0.0.1:{self.port}/{p}" for p in self.backend_ports[:count]]

    def pids(self) -> list[int]:
        return descendants(self.process.pid)

    def close(self) -> None:
        _close(self.process)


class Chain:
    """The gateway's proxy chain (bench.chain) for one proxy mode, in front of the backends."""

    def __init__(self, mode: str, backend_ports: list[int], *, proxy_extra: str = "", apache_extra: str = "") -> None:
        self.work = Path(tempfile.mkdtemp(prefix=f"bench-chain-{mode}-"))
        apache_port, *ws_ports = free_ports(len(backend_ports) + 1)
        spec = {"mode": mode, "work": str(self.work), "apache_port": apache_port, "cpus": GATEWAY_CPUS,
                "proxy_extra": proxy_extra, "apache_extra": apache_extra,
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


@dataclass(frozen=True)
class Target:
    """One thing to put load through: its URLs for N sessions and the processes that are "the gateway"."""

    name: str
    urls: Callable[[int], list[str]]
    pids: Callable[[], list[int]] | None  # None: the direct baseline (no gateway)


def _close(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        assert process.stdin is not None
        process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_load(target: Target, count: int, *, duration_s: float, backends: Backends) -> dict[str, object]:
    """N sessions at once for ``duration_s`` through ``target``: latency with losses, CPU on each side."""
    spec = Path(tempfile.mktemp(prefix="bench-load-", suffix=".json"))
    spec.write_text(json.dumps({"urls": target.urls(count), "interval": INTERVAL_S, "duration": duration_s,
                                "connect_timeout": 30, "cpus": LOAD_CPUS}))
    before = cpu_seconds_total(target.pids()) if target.pids else {}
    backends_before = backends.cpu_s()
    client = subprocess.Popen([sys.executable, "-m", "bench.synthetic", "load", str(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    memory = None
    if target.pids is not None:  # memory with every session connected, halfway through
        time.sleep(min(duration_s / 2 + 1, duration_s))
        memory = round(pss_mb(target.pids()), 1)
    try:
        out, err = client.communicate(timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
    spec.unlink(missing_ok=True)
    after = cpu_seconds_total(target.pids()) if target.pids else {}
    if client.returncode != 0:
        raise RuntimeError(f"load client failed: {err.decode(errors='replace')[-2000:]}")
    return summarize(json.loads(out), duration_s=duration_s,
                     gateway_cpu_s=sum(after.get(p, 0) - before.get(p, 0) for p in after) if target.pids else None,
                     load_cpu_s=result_cpu(out) + backends.cpu_s() - backends_before, gateway_pss_mb=memory)


def result_cpu(out: bytes) -> float:
    return float(json.loads(out).get("client_cpu_s", 0.0))


def summarize(result: dict, *, duration_s: float, gateway_cpu_s: float | None, load_cpu_s: float | None = None,
              gateway_pss_mb: float | None = None) -> dict[str, object]:
    """One run's figures from the load client's totals; lost events count as round trips of ``duration_s``."""
    latency = latency_with_losses(result["rtts_ms"], result["lost_events"], duration_s)
    received_gb = result["received_mb"] / 1000
    summary: dict[str, object] = {
        **latency, "failed": result["failed"], "expected_events": result["expected_events"],
        "received_mb_per_s": round(result["received_mb"] / result.get("elapsed_s", duration_s), 1),
        "negotiated": result.get("negotiated", []),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "load_cpu_s": None if load_cpu_s is None else round(load_cpu_s, 2),
    }
    if gateway_cpu_s is not None:
        summary["gateway_cpu_s"] = round(gateway_cpu_s, 2)
        summary["gateway_cpu_s_per_gb"] = round(gateway_cpu_s / received_gb, 1) if received_gb else None
        summary["gateway_pss_mb"] = gateway_pss_mb
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
