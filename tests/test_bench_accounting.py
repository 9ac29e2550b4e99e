"""The load benchmark counts what it loses: on a tiny run with a backend that drops every other input event
and a session that cannot connect, every due event that never came back is lost, and each lost event weighs
in the percentiles as a round trip of the whole run. (Behaviour only; no timings are asserted.)"""

from __future__ import annotations

import asyncio
import struct

from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.common import spread
from bench.load import summarize
from bench.synthetic import (
    EVENT_LEN,
    backend_session,
    backend_ws_session,
    run_sessions,
)
from tests.system import free_port

DURATION_S = 0.5
INTERVAL_S = 0.05
EVENTS = int(DURATION_S / INTERVAL_S)  # due per session


async def drop_odd_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that echoes only even-numbered input events, and sends no frame data."""
    try:
        while True:
            event = await reader.readexactly(EVENT_LEN)
            if struct.unpack(">I", event[:4])[0] % 2 == 0:
                writer.write(b"\x01" + event)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def test_lost_events_are_counted_and_weigh_as_the_runs_length() -> None:
    good = await asyncio.start_server(lambda r, w: backend_session(r, w, 100_000), "127.0.0.1", 0)
    lossy = await asyncio.start_server(drop_odd_events, "127.0.0.1", 0)
    async def ws_backend(request: web.Request) -> web.WebSocketResponse:
        return await backend_ws_session(request, 100_000)

    app = web.Application()
    app.router.add_get("/ws", ws_backend)
    async with good, lossy, TestServer(app) as ws_server:
        urls = [f"tcp://127.0.0.1:{good.sockets[0].getsockname()[1]}",
                f"tcp://127.0.0.1:{lossy.sockets[0].getsockname()[1]}",
                f"tcp://127.0.0.1:{free_port()}",  # nothing listens: the session fails, all its events are lost
                f"ws://127.0.0.1:{ws_server.port}/ws"]
        result = await run_sessions(urls, interval=INTERVAL_S, duration=DURATION_S, connect_timeout=2)

    assert result["expected_events"] == 4 * EVENTS
    assert result["failed"] == 1
    lost = EVENTS // 2 + EVENTS  # the odd ones of the lossy backend, and every one of the failed session
    assert result["lost_events"] == lost
    assert len(result["rtts_ms"]) == 4 * EVENTS - lost
    assert result["received_mb"] > 0  # frame data from the good backends is counted
    # The websocket session offered what Chromium offers; the baseline backend declined deflate.
    assert result["negotiated"] == ["deflate=0 protocol=binary"]

    summary = summarize(result, duration_s=DURATION_S, gateway_cpu_s=1.0)
    assert summary["lost_events"] == lost and summary["expected_events"] == 4 * EVENTS
    assert summary["lost_share"] == round(lost / (4 * EVENTS), 4)
    # 15 of 40 samples are lost: from the p99 down to the 63rd percentile, they are the run's length.
    assert summary["p99_ms"] == DURATION_S * 1000
    assert summary["p99_echoed_ms"] < DURATION_S * 1000
    assert summary["gateway_cpu_s_per_gb"] == round(1.0 / (result["received_mb"] / 1000), 1)


def test_spread_is_min_median_max_of_the_rounds() -> None:
    assert spread([3.0, None, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    assert spread([None]) == {"min": None, "median": None, "max": None, "n": 0}
    assert spread([1.0, 4.0])["median"] == 2.5
