"""The builtin relay negotiates permessage-deflate as proxy.compression says, whatever the browser offers.

Chromium offers ``permessage-deflate; client_max_window_bits`` on every websocket (checked with
Playwright, /work/shared/reference/facts.md). aiohttp's server accepts that by default, and then
deflates every VNC frame again; the relay must only accept it when the config asks for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.backends.base import Endpoint
from gateway.model.config import parse_config
from gateway.proxies.relay import BuiltinRelay
from gateway.model.status import DesktopSlot
from gateway.model.tokens import parse_tokens

ACCOUNT = parse_tokens("ws01 localhost /desktop/ws01 6001 5901 abcdefg\n").accounts[0]
#: What Chromium 156 sends when it opens noVNC's websocket.
CHROMIUM_UPGRADE = {
    "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": "binary",
    "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
}
#: Data as VNC sends it after Tight/ZRLE: not compressible any further, but a repeated block is.
FRAME = bytes(range(256)) * 256


async def echo_vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"RFB 003.008\n")
    while data := await reader.read(65536):
        writer.write(FRAME if data == b"frame" else data)
    writer.close()


async def relay_client(config_text: str) -> AsyncIterator[TestClient]:
    server = await asyncio.start_server(echo_vnc, "127.0.0.1", 0)
    relay = BuiltinRelay(parse_config(config_text), {ACCOUNT.id: DesktopSlot(ACCOUNT)})
    app = aiohttp.web.Application()
    app.router.add_routes(relay.web_routes([ACCOUNT]))
    await relay.start(ACCOUNT, Endpoint("127.0.0.1", server.sockets[0].getsockname()[1]))
    async with server, TestClient(TestServer(app)) as client:
        yield client


@pytest.fixture
async def relay_off() -> AsyncIterator[TestClient]:
    async for client in relay_client("proxy:\n  mode: builtin\n"):
        yield client


@pytest.fixture
async def relay_on() -> AsyncIterator[TestClient]:
    async for client in relay_client("proxy:\n  mode: builtin\n  compression: true\n"):
        yield client


async def upgrade_headers(client: TestClient) -> Mapping[str, str]:
    """The relay's answer to exactly Chromium's upgrade request."""
    response = await client.get(ACCOUNT.websocket_path, headers=CHROMIUM_UPGRADE)
    assert response.status == 101
    headers = response.headers
    response.close()
    return headers


def test_compression_is_off_by_default() -> None:
    assert parse_config("").proxy.compression is False


async def test_default_config_refuses_chromiums_deflate_offer(relay_off: TestClient) -> None:
    headers = await upgrade_headers(relay_off)
    assert headers["Sec-WebSocket-Protocol"] == "binary"
    assert "Sec-WebSocket-Extensions" not in headers
    # And a client that deflates if it may (as Chromium does) relays uncompressed frames.
    async with relay_off.ws_connect(ACCOUNT.websocket_path, protocols=("binary",), compress=15) as ws:
        assert ws.compress == 0
        assert await ws.receive_bytes() == b"RFB 003.008\n"
        await ws.send_bytes(b"frame")
        assert await ws.receive_bytes() == FRAME


async def test_compression_true_accepts_chromiums_offer(relay_on: TestClient) -> None:
    headers = await upgrade_headers(relay_on)
    assert headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
    async with relay_on.ws_connect(ACCOUNT.websocket_path, protocols=("binary",), compress=15) as ws:
        assert ws.compress == 15
        assert await ws.receive_bytes() == b"RFB 003.008\n"
        await ws.send_bytes(b"frame")
        assert await ws.receive_bytes() == FRAME  # inflated again by the client, bytes unchanged
