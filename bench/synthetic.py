"""Synthetic VNC-like sessions: a backend that streams frame data and echoes input, and its client.

Wire format (both directions are a byte stream; proxies in between only move bytes):

* backend to client: ``0x00 U32 length payload`` frame data, about ``rate`` bytes per second, and
  ``0x01 EVENT`` (9 bytes) echoing each 8-byte input event at once;
* client to backend: 8-byte input events ``U32 sequence, U32 0``, one every 50 ms.

``python -m bench.synthetic serve PORT...`` runs backends until stdin closes.
``python -m bench.synthetic load SPEC.json`` runs sessions and prints a JSON summary.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time

import aiohttp

__all__ = ["serve", "run_sessions"]

CHUNK = 32 * 1024
EVENT_LEN = 8


async def _backend_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int) -> None:
    frame = b"\x00" + struct.pack(">I", CHUNK) + bytes(CHUNK)
    interval = CHUNK / rate

    async def stream() -> None:
        next_at = time.monotonic()
        while not writer.is_closing():
            writer.write(frame)
            await writer.drain()
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    streamer = asyncio.ensure_future(stream())
    streamer.add_done_callback(lambda task: task.cancelled() or task.exception())  # a closed peer is normal
    try:
        pending = b""
        while data := await reader.read(4096):
            pending += data
            whole = len(pending) - len(pending) % EVENT_LEN
            for i in range(0, whole, EVENT_LEN):
                writer.write(b"\x01" + pending[i:i + EVENT_LEN])
            pending = pending[whole:]
    except (ConnectionError, OSError):
        pass
    finally:
        streamer.cancel()
        writer.close()


async def serve(ports: list[int], rate: int) -> None:
    servers = [await asyncio.start_server(lambda r, w: _backend_session(r, w, rate), "127.0.0.1", port, backlog=1024)
               for port in ports]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the harness closes our stdin
    for server in servers:
        server.close()


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
        count = int(self.duration / self.interval)
        started = time.perf_counter()
        for seq in range(count):
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
        async with http.ws_connect(self.url, protocols=("binary",), max_msg_size=0, autoping=True) as ws:
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
    """Run one session per URL at once; URLs are ws://... or tcp://host:port."""
    sessions = [_Session(url, interval, duration) for url in urls]
    failed = 0
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
    failed = results.count(False)
    rtts = [r for s in sessions for r in s.rtts]
    lost = sum(len(s.sent) for s in sessions)
    return {"rtts_ms": rtts, "failed": failed, "lost_events": lost,
            "received_mb": sum(s.received_bytes for s in sessions) / 1e6}


def main(argv: list[str]) -> None:
    if argv[0] == "serve":
        asyncio.run(serve([int(p) for p in argv[2:]], rate=int(argv[1])))
    elif argv[0] == "load":
        spec = json.loads(open(argv[1]).read())
        result = asyncio.run(run_sessions(spec["urls"], interval=spec["interval"], duration=spec["duration"],
                                          connect_timeout=spec["connect_timeout"]))
        print(json.dumps(result))
    else:
        raise SystemExit("usage: python -m bench.synthetic serve RATE PORT... | load SPEC.json")


if __name__ == "__main__":
    main(sys.argv[1:])
