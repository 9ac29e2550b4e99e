"""Real desktops under a real workload, watched as noVNC watches them, straight and through the gateway.

Each of N local desktops (a real `gateway up`: Xvnc, openbox) runs a workload that changes the screen:
an xterm printing the time every 100 ms, moved back and forth by `xdotool` every 2 s, and a small "probe" xterm
(running `cat`, so a typed key is echoed at once) that has the keyboard focus. In each round one client per
desktop watches it: for half of the desktops straight (TCP to its Xvnc, no gateway), for the other half
through the gateway (websocket through Apache, with Chromium's handshake), all at the same time; the halves
swap from round to round. Each client speaks RFB with the project's RFB client
(gateway.common.rfb.handshake): it asks for ZRLE and CopyRect, requests the next incremental update as soon
as one has arrived (as noVNC does), and every ``KEY_EVERY_S`` types a key. Measured per path:

* bytes per second and updates per second;
* key-to-pixel: from sending the key to the first update that touches the probe window
  (nothing else draws there); a key with no such update within ``KEY_LOST_S`` is lost and counts
  as ``KEY_LOST_S``.

Both paths are measured at the same time, so "added" is against the same kind of desktop under the same load
(on 2 cores, 60 desktops keep the load generator's core busy, and figures measured one after the other
differ more between rounds than the gateway adds). The update stream of each desktop is also sampled to
decide permessage-deflate: it is deflated afterwards per update at zlib level 1 with context takeover (what
aiohttp does), for its ratio and CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from gateway.common import rfb
from tests.gateway_run import display_env

from .common import cpu_seconds_total, latency_with_losses, spread
from .desktops import GatewayUp
from .load import GATEWAY_CPUS, LOAD_CPUS

__all__ = ["measure_real_desktops"]

T = TypeVar("T")

ENCODINGS = (16, 1, 0, -223)  # ZRLE, CopyRect, Raw, DesktopSize
KEY_EVERY_S = 0.5
#: The real-desktop benchmark's workload: ten lines a second and a move every two seconds on each desktop,
#: so that 60 desktops and their viewers fit on the load generator's one core (with the Wi-Fi benchmark's
#: 20 lines and one move a second, 60 desktops saturate it and the figures measure the overload).
PRINT_EVERY_S = 0.1
MOVE_EVERY_S = 2.0
KEY_LOST_S = 2.0
SAMPLE_BYTES = 2_000_000  # update stream kept per desktop for the deflate measurement
KEYSYM_A = 0x61
PROBE_MARGIN = 40


class _Counting:
    """A reader that counts what it hands out and keeps the current message's bytes."""

    def __init__(self, reader: rfb.ByteReader) -> None:
        self.reader = reader
        self.bytes = 0
        self.message = bytearray()
        self.keep = True

    async def readexactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.bytes += n
        if self.keep:
            self.message += data
        return data


@dataclass
class _Viewer:
    """One desktop's watcher: counts updates and times the probe's echo of each key."""

    probe: tuple[int, int, int, int]  # x, y, width, height of the probe window
    updates: int = 0
    key_rtts_ms: list[float] = field(default_factory=list)
    keys_lost: int = 0
    key_sent_at: float | None = None
    samples: list[bytes] = field(default_factory=list)
    sampled: int = 0

    first_update: asyncio.Event = field(default_factory=asyncio.Event)

    def touches_probe(self, x: int, y: int, w: int, h: int) -> bool:
        # xdotool's geometry of a decorated window is off by its title bar: a margin around it
        # (nothing else draws within PROBE_MARGIN of the probe).
        px, py, pw, ph = self.probe
        px, py, pw, ph = px - PROBE_MARGIN, py - PROBE_MARGIN, pw + 2 * PROBE_MARGIN, ph + 2 * PROBE_MARGIN
        return x < px + pw and px < x + w and y < py + ph and py < y + h

    async def read_update(self, reader: _Counting) -> None:
        """One FramebufferUpdate (its type byte already read), payloads skipped."""
        _, count = struct.unpack(">BH", await reader.readexactly(3))
        hit = False
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await reader.readexactly(12))
            if encoding == 16:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                await reader.readexactly(length)
            elif encoding == 1:
                await reader.readexactly(4)
            elif encoding == 0:
                await reader.readexactly(w * h * 4)
            elif encoding != -223:
                raise rfb.RfbError(f"unexpected encoding {encoding}")
            hit = hit or (encoding != -223 and self.touches_probe(x, y, w, h))
        self.updates += 1
        self.first_update.set()
        if hit and self.key_sent_at is not None:
            self.key_rtts_ms.append((time.perf_counter() - self.key_sent_at) * 1000)
            self.key_sent_at = None

    def start_counting(self, reader: _Counting) -> None:
        """Count from now on: the first (whole-screen) updates of a round are not the workload's traffic."""
        self.updates, reader.bytes = 0, 0
        self.samples, self.sampled = [], 0

    async def watch(self, reader: _Counting, writer: rfb.ByteWriter, width: int, height: int) -> None:
        writer.write(struct.pack(">BxH", 2, len(ENCODINGS)) + b"".join(struct.pack(">i", e) for e in ENCODINGS))
        writer.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        await writer.drain()
        while True:  # until cancelled
            reader.message = bytearray()
            reader.keep = self.sampled < SAMPLE_BYTES
            kind = (await reader.readexactly(1))[0]
            if kind == 0:
                await self.read_update(reader)
                writer.write(struct.pack(">BBHHHH", 3, 1, 0, 0, width, height))  # the next incremental update
                await writer.drain()
            elif kind == 2:  # Bell
                pass
            elif kind == 3:  # ServerCutText
                (length,) = struct.unpack(">3xI", await reader.readexactly(7))
                await reader.readexactly(length)
            else:
                raise rfb.RfbError(f"unexpected server message {kind}")
            if reader.keep:
                self.samples.append(bytes(reader.message))
                self.sampled += len(reader.message)

    async def type_key(self, writer: rfb.ByteWriter) -> None:
        """Type one key and wait for the update that shows it (or count it lost after ``KEY_LOST_S``)."""
        self.key_sent_at = sent = time.perf_counter()
        writer.write(struct.pack(">BBxxI", 4, 1, KEYSYM_A) + struct.pack(">BBxxI", 4, 0, KEYSYM_A))
        await writer.drain()
        deadline = time.monotonic() + KEY_LOST_S
        while self.key_sent_at == sent and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.key_sent_at == sent:
            self.keys_lost += 1
            self.key_sent_at = None


@dataclass
class _Connection:
    """One viewer's RFB connection to a desktop (straight or through the gateway), watched until closed."""

    viewer: _Viewer
    reader: _Counting
    writer: rfb.ByteWriter
    watcher: asyncio.Future[None]


class _Watched:
    """One desktop, watched by one viewer (straight or through the gateway) for a round."""

    def __init__(self, via: str, open_stream: object, password: str, probe: tuple[int, int, int, int]) -> None:
        self.via, self.open_stream, self.password, self.probe = via, open_stream, password, probe
        self.connection: _Connection | None = None
        self.stack = contextlib.AsyncExitStack()

    async def connect(self) -> None:
        reader, writer = await self.stack.enter_async_context(self.open_stream())  # type: ignore[operator]
        counting = _Counting(reader)
        session = await rfb.handshake(counting, writer, self.password)
        viewer = _Viewer(self.probe)
        watcher = asyncio.ensure_future(viewer.watch(counting, writer, session.width, session.height))
        self.connection = _Connection(viewer, counting, writer, watcher)

    async def first_update(self) -> None:
        assert self.connection is not None
        await self.connection.viewer.first_update.wait()

    async def type_keys(self, until: float) -> None:
        assert self.connection is not None
        viewer = self.connection.viewer
        viewer.start_counting(self.connection.reader)
        while time.monotonic() + KEY_LOST_S < until:
            await viewer.type_key(self.connection.writer)
            await asyncio.sleep(KEY_EVERY_S)

    async def close(self) -> tuple[_Viewer, int] | None:
        """Stop watching; the viewer and the bytes it counted, if it connected."""
        connection = self.connection
        if connection is not None:
            connection.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connection.watcher
        await self.stack.aclose()
        return None if connection is None else (connection.viewer, connection.reader.bytes)


def _tcp(port: int):  # type: ignore[no-untyped-def]
    @contextlib.asynccontextmanager
    async def open_stream():  # type: ignore[no-untyped-def]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            yield reader, writer
        finally:
            writer.close()
    return open_stream


def _ws(http: aiohttp.ClientSession, url: str):  # type: ignore[no-untyped-def]
    @contextlib.asynccontextmanager
    async def open_stream():  # type: ignore[no-untyped-def]
        # As Chromium opens noVNC's websocket: subprotocol binary, deflate offered.
        async with http.ws_connect(url, protocols=("binary",), compress=15, max_msg_size=0) as ws:
            stream = rfb.WebSocketStream(ws)
            yield stream, stream
    return open_stream


#: The printing xterm's program: one process that never forks (a shell loop of `date` and `sleep` forks
#: twice per line, which at 60 desktops is thousands of forks a second, and measures the kernel, not the gateway).
TICKER = "import sys, time\nwhile True:\n    print(time.strftime('%T'), time.time() % 1, flush=True)\n    time.sleep({every})"


def start_workload(run: GatewayUp, index: int, *, print_every_s: float = 0.05, move_every_s: float = 1.0
                   ) -> tuple[list[subprocess.Popen[bytes]], tuple[int, int, int, int]]:
    """The workload on desktop ``index``: a terminal printing a line every ``print_every_s``, moved every
    ``move_every_s`` by xdotool, and the focused probe terminal; returns its processes and the probe's geometry."""
    account = run.accounts[index]
    env = display_env(run.tmp / "state", account.id)
    printer = ["xterm", "-geometry", "80x20+0+0", "-title", f"printer{index}", "-e", "python3", "-c",
               TICKER.format(every=print_every_s)]
    probe = ["xterm", "-geometry", "30x3-40-40", "-title", f"probe{index}", "-e", "cat"]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True) for argv in (printer, probe)]
    geometry = _xdotool_until(env, ["search", "--sync", "--name", f"probe{index}", "windowactivate", "--sync",
                                    "getwindowgeometry", "--shell"], _geometry,
                              what=f"the probe window of {account.id}")
    # The printer's window is looked up once: `xdotool search` on every move lists every window of the
    # display, and at 60 desktops that alone took half a core.
    printer_window = _xdotool_until(env, ["search", "--sync", "--name", f"printer{index}"],
                                    lambda out: int(out.split()[0]) if out.split() else None,
                                    what=f"the printer window of {account.id}")
    mover = ["sh", "-c", f"while :; do for x in 0 120 240 120; do xdotool windowmove {printer_window} $x 0; "
             f"sleep {move_every_s}; done; done"]
    procs.append(subprocess.Popen(mover, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True))
    for proc in procs:
        _pin_tree(proc.pid, LOAD_CPUS)
    return procs, geometry


def _xdotool_until(env: dict[str, str], args: list[str], parse: Callable[[str], T | None], *, what: str) -> T:
    """Run ``xdotool ARGS`` until ``parse`` finds an answer in its output: a busy desktop maps windows late."""
    for _ in range(100):
        with contextlib.suppress(subprocess.TimeoutExpired):
            out = subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=10)
            if (answer := parse(out.stdout)) is not None:
                return answer
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not appear")


def _geometry(xdotool_shell_output: str) -> tuple[int, int, int, int] | None:
    values = dict(line.split("=", 1) for line in xdotool_shell_output.splitlines() if "=" in line)
    if not {"X", "Y", "WIDTH", "HEIGHT"} <= values.keys():
        return None
    return int(values["X"]), int(values["Y"]), int(values["WIDTH"]), int(values["HEIGHT"])


def _pin_tree(pid: int, cpus: list[int]) -> None:
    from .common import descendants

    if cpus:
        for member in descendants(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(member, set(cpus))


def _deflate(samples: list[bytes]) -> dict[str, float | None]:
    """permessage-deflate as aiohttp would do it: level 1, raw deflate, context kept, sync flush per message."""
    total = sum(len(s) for s in samples)
    if not total:
        return {"ratio": None, "cpu_ms_per_mb": None}
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    started = time.process_time()
    out = sum(len(compressor.compress(s) + compressor.flush(zlib.Z_SYNC_FLUSH)) for s in samples)
    cpu = time.process_time() - started
    return {"ratio": round(out / total, 3), "cpu_ms_per_mb": round(cpu * 1000 / (total / 1e6), 2)}


def _path_figures(results: list[tuple[_Viewer, int]], failed: int, duration_s: float) -> dict:
    rtts = [ms for v, _ in results for ms in v.key_rtts_ms]
    lost = sum(v.keys_lost for v, _ in results)
    total_bytes = sum(b for _, b in results)
    keys = latency_with_losses(rtts, lost, KEY_LOST_S)
    return {
        "failed": failed, "key_p50_ms": keys["p50_ms"], "key_p99_ms": keys["p99_ms"], "keys_lost": lost,
        "keys": len(rtts) + lost, "bytes": total_bytes,
        "kb_per_s_per_desktop": round(total_bytes / 1000 / duration_s / max(1, len(results)), 1),
        "updates_per_s_per_desktop": round(sum(v.updates for v, _ in results) / duration_s / max(1, len(results)), 1),
    }


async def _round(run: GatewayUp, probes: list[tuple[int, int, int, int]], duration_s: float,
                 number: int) -> dict[str, dict]:
    """Half of the desktops watched straight and the other half through the gateway, at the same time
    (which half alternates from round to round). The measured window starts once every connection has had
    its first, whole-screen update (60 of them keep the load generator's core busy for a while) and the
    desktops have settled for a second."""
    gateway = [p for pids in run.gateway_pids().values() for p in pids]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        desktops = [_Watched("gateway", _ws(http, run.url(a)), a.password, probe) if (index + number) % 2 else
                    _Watched("direct", _tcp(a.vnc_port), a.password, probe)
                    for index, (a, probe) in enumerate(zip(run.accounts, probes))]
        connected = await asyncio.gather(*(desktop.connect() for desktop in desktops), return_exceptions=True)
        live = [desktop for desktop, result in zip(desktops, connected) if not isinstance(result, BaseException)]
        try:
            await asyncio.wait_for(asyncio.gather(*(desktop.first_update() for desktop in live)), 120)
            await asyncio.sleep(1)
            before = cpu_seconds_total(gateway)
            until = time.monotonic() + duration_s
            await asyncio.gather(*(desktop.type_keys(until) for desktop in live))
            after = cpu_seconds_total(gateway)
        finally:
            watched = [await desktop.close() for desktop in desktops]
    failed = {via: sum(1 for d in desktops if d not in live and d.via == via) for via in ("direct", "gateway")}
    by_path: dict[str, list[tuple[_Viewer, int]]] = {"direct": [], "gateway": []}
    for desktop, result in zip(desktops, watched):
        if desktop in live and result is not None:
            by_path[desktop.via].append(result)
    direct = _path_figures(by_path["direct"], failed["direct"], duration_s)
    direct["deflate"] = _deflate([s for viewer, _ in by_path["direct"] for s in viewer.samples])
    through = _path_figures(by_path["gateway"], failed["gateway"], duration_s)
    gateway_cpu = sum(after.get(p, 0) - before.get(p, 0) for p in after)
    through["gateway_cpu_s"] = round(gateway_cpu, 2)
    through["gateway_cpu_s_per_gb"] = round(gateway_cpu / (through["bytes"] / 1e9), 1) if through["bytes"] else None
    if direct["key_p99_ms"] is not None and through["key_p99_ms"] is not None:
        through["key_p99_added_ms"] = round(through["key_p99_ms"] - direct["key_p99_ms"], 2)
    return {"direct": direct, "gateway": through}


async def measure_real_desktops(count: int, mode: str, *, rounds: int, duration_s: float, timeout_s: float,
                                print_every_s: float = PRINT_EVERY_S, move_every_s: float = MOVE_EVERY_S
                                ) -> dict[str, object]:
    """N real desktops with the workload, ``rounds`` times watched straight and through ``mode`` at once."""
    run = GatewayUp(count, mode)
    workloads: list[subprocess.Popen[bytes]] = []
    try:
        _pin_tree(os.getpid(), LOAD_CPUS)  # this process runs the viewers: the load generator's side
        ready = await run.start_and_wait_ready(timeout_s)
        if ready["seconds"] is None:
            raise RuntimeError(f"{count} desktops were not ready within {timeout_s} s")
        roles = run.gateway_pids()
        gateway = {p for pids in roles.values() for p in pids}
        assert run.process is not None
        from .common import descendants

        for pid in descendants(run.process.pid):  # desktops with the load generator, gateway on its own core
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, set(GATEWAY_CPUS if pid in gateway else LOAD_CPUS) or set(os.sched_getaffinity(0)))
        probes = []
        for index in range(count):
            procs, probe = start_workload(run, index, print_every_s=print_every_s, move_every_s=move_every_s)
            workloads += procs
            probes.append(probe)
        await asyncio.sleep(2)
        out: dict[str, list] = {"direct": [], "gateway": []}
        for number in range(rounds):
            for via, figures in (await _round(run, probes, duration_s, number)).items():
                out[via].append(figures)
        keys = ("key_p50_ms", "key_p99_ms", "key_p99_added_ms", "keys_lost", "failed", "kb_per_s_per_desktop",
                "updates_per_s_per_desktop", "gateway_cpu_s", "gateway_cpu_s_per_gb")
        summary = {via: {k: spread([r.get(k) for r in runs]) for k in keys} for via, runs in out.items()}
        deflate = [r["deflate"] for r in out["direct"] if r["deflate"]]
        return {"workload": {"print_every_s": print_every_s, "move_every_s": move_every_s},
                "rounds": out, "summary": summary, "deflate": {
            "ratio": spread([d["ratio"] for d in deflate]), "cpu_ms_per_mb": spread([d["cpu_ms_per_mb"] for d in deflate])}}
    finally:
        for proc in workloads:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, 9)
            proc.wait()
        run.stop()
