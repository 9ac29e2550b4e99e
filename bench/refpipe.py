"""The reference pipe: the least a websocket-to-TCP relay can be, in aiohttp, to measure the gateway against.

``python -m bench.refpipe CPUS`` listens on a free loopback port, prints it, and relays
``ws://127.0.0.1:PORT/BACKEND_PORT`` to ``127.0.0.1:BACKEND_PORT`` until stdin closes. Like the
builtin relay's default it refuses permessage-deflate, so the two are compared on the same work.
Bench-only: no limits, no checks, no accounting.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import WSMsgType, web

from .synthetic import pin


async def pipe(request: web.Request) -> web.WebSocketResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(request.match_info["port"]))
    ws = web.WebSocketResponse(protocols=("binary",), compress=False, max_msg_size=0)
    await ws.prepare(request)

    async def to_backend() -> None:
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()

    async def to_client() -> None:
        while data := await reader.read(256 * 1024):
            await ws.send_bytes(data)

    tasks = [asyncio.ensure_future(to_backend()), asyncio.ensure_future(to_client())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    writer.close()
    await ws.close()
    return ws


async def main(cpus: list[int]) -> None:
    pin(cpus)
    app = web.Application()
    app.router.add_get("/{port}", pipe)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main([int(c) for c in sys.argv[1].split(",") if c]))
