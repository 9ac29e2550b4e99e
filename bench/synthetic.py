"""Synthetic VNC-like sessions: a backend that streams frame data and echoes input, and its client.

Wire format (both directions are a byte stream; proxies in between only move bytes):

* backend to client: ``0x00 U32 length payload`` frame data, about ``rate`` bytes per second, and
  ``0x01 EVENT`` (9 bytes) echoing each 8-byte input event at once;
* client to backend: 8-byte input events ``U32 sequence, U32 0``, one every 50 ms.

``python -m bench.synthetic serve RATE WS_PORT PORT...`` runs backends until stdin closes: one TCP
port per account (what the proxy chains relay to), and one websocket server on WS_PORT whose path
``/PORT`` is the same backend spoken straight over websocket (the direct baseline, no proxy at all).
``python -m bench.synthetic load SPEC.json`` runs sessions and prints a JSON summary.

Clients open their websockets as Chromium does: subprotocol ``binary`` and the extension offer
``permessage-deflate; client_max_window_bits``; what each chain accepted is recorded.
Both commands pin themselves to the CPUs the harness names (``--cpus`` / ``"cpus"``), so that the
load generator and the gateway under test do not share a core.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

__all__ = ["serve", "run_sessions", "pin", "CHROMIUM_WBITS"]

#: aiohttp's client offers exactly Chromium's ``permessage-deflate; client_max_window_bits`` with 15.
CHROMIUM_WBITS = 15


def pin(cpus: list[int] | None) -> None:
    """Run this process (and what it starts later) on these CPUs only; None leaves it free."""
    if cpus:
        os.sched_setaffinity(0, set(cpus))

CHUNK = 32 * 1024
EVENT_LEN = 8


async def _stream_frames(send: Callable[[bytes], Awaitable[None]], rate: int) -> None:
    """Frame data at ``rate`` bytes per second, until sending fails."""
    frame = b"\x00" + struct.pack(">I", CHUNK) + bytes(CHUNK)
    interval = CHUNK / rate
    next_at = time.monotonic()
    while True:
        await send(frame)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


class _Echo:
    """Turns received input bytes into echo messages (whole 8-byte events only)."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        self.pending += data
        whole = len(self.pending) - len(self.pending) % EVENT_LEN
        out = b"".join(b"\x01" + self.pending[i:i + EVENT_LEN] for i in range(0, whole, EVENT_LEN))
        self.pending = self.pending[whole:]
        return out


def _quiet(task: asyncio.Task) -> None:  # type: ignore[type-arg]
    task.cancelled() or task.exception()  # a closed peer is normal


async def backend_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int) -> None:
    async def send(data: bytes) -> None:
        if writer.is_closing():
            raise ConnectionResetError
        writer.write(data)
        await writer.drain()

    streamer = asyncio.ensure_future(_stream_frames(send, rate))
    streamer.add_done_callback(_quiet)
    echo = _Echo()
    try:
        while data := await reader.read(4096):
            if out := echo.feed(data):
                writer.write(out)
    except (ConnectionError, OSError):
        pass
    finally:
        streamer.cancel()
        writer.close()


async def backend_ws_session(request: web.Request, rate: int) -> web.WebSocketResponse:
    """The same backend over websocket: the direct baseline (no deflate: an ideal, free proxy)."""
    ws = web.WebSocketResponse(protocols=("binary",), compress=False, max_msg_size=0)
    await ws.prepare(request)
    streamer = asyncio.ensure_future(_stream_frames(ws.send_bytes, rate))
    streamer.add_done_callback(_quiet)
    echo = _Echo()
    try:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY and (out := echo.feed(msg.data)):
                await ws.send_bytes(out)
    except (ConnectionError, OSError):
        pass
    finally:
        streamer.cancel()
    return ws


async def serve(ports: list[int], rate: int, ws_port: int) -> None:
    servers = [await asyncio.start_server(lambda r, w: backend_session(r, w, rate), "127.0.0.1", port, backlog=1024)
               for port in ports]
    async def ws_backend(request: web.Request) -> web.WebSocketResponse:
        return await backend_ws_session(request, rate)

    app = web.Application()
    app.router.add_get("/{port}", ws_backend)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ws_port, backlog=1024).start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the harness closes our stdin
    for server in servers:
        server.close()
    await runner.cleanup()


class _Session:
    """One client: sends an event every ``interval`` s for ``duration`` s, records round trips."""

    def __init__(self, url: str, interval: float, duration: float) -> None:
        self.url = url
        self.interval = interval
        self.duration = duration
        self.rtts: list[float] = []
        self.sent: dict[int, float] = {}
        self.received_bytes = 0
        self.partial = b""
        self.skip = 0
        #: Events this session should send; every one not echoed in time is lost.
        self.expected = int(duration / interval)
        #: What the server accepted of Chromium's offer: (permessage-deflate window bits or 0, subprotocol).
        self.negotiated: tuple[int, str | None] | None = None

    def parse(self, data: bytes) -> None:
        """Find echoes in the next received bytes; frame payloads are skipped, not copied."""
        self.received_bytes += len(data)
        now = time.perf_counter()
        i, n = 0, len(data)
        if self.skip:
            i = min(self.skip, n)
            self.skip -= i
        if self.partial and i < n:
            data, i, n = self.partial + data[i:], 0, len(self.partial) + n - i
            self.partial = b""
        while i < n:
            kind = data[i]
            if kind == 1:
                if n - i < 9:
                    break
                seq = struct.unpack_from(">I", data, i + 1)[0]
                sent = self.sent.pop(seq, None)
                if sent is not None:
                    self.rtts.append((now - sent) * 1000)
                i += 9
            elif kind == 0:
                if n - i < 5:
                    break
                end = i + 5 + struct.unpack_from(">I", data, i + 1)[0]
                if end > n:
                    self.skip = end - n
                    i = n
                    break
                i = end
            else:
                raise ValueError(f"stream out of step: byte {kind}")
        if i < n:
            self.partial += bytes(data[i:])

    async def events(self, send) -> None:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        for seq in range(self.expected):
            await asyncio.sleep(max(0.0, started + seq * self.interval - time.perf_counter()))
            self.sent[seq] = time.perf_counter()
            await send(struct.pack(">II", seq, 0))
        await asyncio.sleep(0.5)  # the last echoes

    async def run_tcp(self, host: str, port: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def receive() -> None:
            while data := await reader.read(256 * 1024):
                self.parse(data)

        receiver = asyncio.ensure_future(receive())
        try:
            await self.events(send)
        finally:
            receiver.cancel()
            writer.close()

    async def run_ws(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(self.url, protocols=("binary",), max_msg_size=0, autoping=True,
                                   compress=CHROMIUM_WBITS) as ws:
            self.negotiated = (ws.compress, ws.protocol)
            async def receive() -> None:
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        self.parse(msg.data)

            receiver = asyncio.ensure_future(receive())
            try:
                await self.events(ws.send_bytes)
            finally:
                receiver.cancel()


async def run_sessions(urls: list[str], *, interval: float, duration: float, connect_timeout: float) -> dict:
    """Run one session per URL at once; URLs are ws://... or tcp://host:port.

    Returns every echoed round trip, and the events that were due but never echoed (``lost``:
    late, dropped, or never sent because the session failed), so that a chain which drops input
    cannot look fast.
    """
    sessions = [_Session(url, interval, duration) for url in urls]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def one(session: _Session) -> bool:
            try:
                async with asyncio.timeout(duration + connect_timeout + 5):
                    if session.url.startswith("tcp://"):
                        host, port = session.url[6:].rsplit(":", 1)
                        await session.run_tcp(host, int(port))
                    else:
                        await session.run_ws(http)
                return bool(session.rtts)
            except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                print(f"session failed: {session.url.split('?')[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return False

        results = await asyncio.gather(*(one(s) for s in sessions))
    return tally(sessions, failed=results.count(False))


def tally(sessions: list[_Session], *, failed: int) -> dict:
    """The totals of finished sessions: round trips, lost events, bytes, what was negotiated."""
    expected = sum(s.expected for s in sessions)
    rtts = [r for s in sessions for r in s.rtts]
    negotiated = sorted({f"deflate={s.negotiated[0]} protocol={s.negotiated[1]}" for s in sessions if s.negotiated})
    return {"rtts_ms": rtts, "failed": failed, "expected_events": expected, "lost_events": expected - len(rtts),
            "received_mb": sum(s.received_bytes for s in sessions) / 1e6, "negotiated": negotiated}


def main(argv: list[str]) -> None:
    if argv[0] == "serve":  # serve CPUS RATE WS_PORT PORT...
        pin([int(c) for c in argv[1].split(",") if c])
        asyncio.run(serve([int(p) for p in argv[4:]], rate=int(argv[2]), ws_port=int(argv[3])))
    elif argv[0] == "load":
        spec = json.loads(open(argv[1]).read())
        pin(spec.get("cpus"))
        started, wall = time.process_time(), time.monotonic()
        result = asyncio.run(run_sessions(spec["urls"], interval=spec["interval"], duration=spec["duration"],
                                          connect_timeout=spec["connect_timeout"]))
        result["client_cpu_s"] = round(time.process_time() - started, 2)
        result["elapsed_s"] = round(time.monotonic() - wall, 2)  # the run, its last echoes and connecting
        print(json.dumps(result))
    else:
        raise SystemExit("usage: python -m bench.synthetic serve CPUS RATE WS_PORT PORT... | load SPEC.json")


if __name__ == "__main__":
    main(sys.argv[1:])
