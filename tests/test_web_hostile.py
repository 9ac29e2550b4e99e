"""Hostile HTTP against a real gateway behind its private Apache: traversal, escaping, oversized
requests, unknown websocket paths, and attempts to make the gateway connect anywhere else."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import aiohttp
import pytest

from tests.gateway_run import GatewayRun, make_accounts
from tests.system import free_port, require_program

pytestmark = pytest.mark.system

HOSTILE_TITLE = "</title><script>alert('x')</script>"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[GatewayRun]:
    for program in ("Xvnc", "vncpasswd", "apache2"):
        require_program(program)
    run = GatewayRun(tmp_path_factory.mktemp("hostile"), make_accounts(1),
                     f'event:\n  title: "{HOSTILE_TITLE}"\n  welcome: "<img src=x onerror=alert(1)>"\n')
    try:
        run.up()
        yield run
        run.terminate()
    finally:
        run.kill_everything()


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("path", [
    "/static/../../../../etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/novnc/..%2f..%2f..%2fetc/passwd",
    "/novnc/%2e%2e%2f%2e%2e%2fetc/passwd",
    "/view/..%2f..%2fetc%2fpasswd",
    "/..%2f..%2fetc/passwd",
])
def test_path_traversal_never_leaks_files(gateway: GatewayRun, path: str) -> None:
    response = raw_request(gateway.listen_port, f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    assert b"root:x:0:0" not in response
    assert status_of(response) in (400, 403, 404)


def test_pages_escape_organiser_text(gateway: GatewayRun) -> None:
    response = raw_request(gateway.listen_port, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert status_of(response) == 200
    assert b"<script>alert('x')</script>" not in response
    assert b"<img src=x" not in response
    assert b"&lt;/title&gt;" in response or b"&lt;script&gt;" in response


def test_unknown_account_page_is_404(gateway: GatewayRun) -> None:
    response = raw_request(gateway.listen_port, b"GET /view/%3Cscript%3E HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert status_of(response) == 404
    assert b"<script>" not in response


def test_oversized_header_is_refused(gateway: GatewayRun) -> None:
    big = b"X-Big: " + b"a" * 20000 + b"\r\n"
    response = raw_request(gateway.listen_port, b"GET / HTTP/1.0\r\nHost: localhost\r\n" + big + b"\r\n")
    assert status_of(response) == 400


async def test_websocket_to_unknown_path_reaches_no_desktop(gateway: GatewayRun) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(f"ws://127.0.0.1:{gateway.listen_port}/desktop/nobody", protocols=("binary",))
        assert info.value.status == 404


class Listener:
    """A TCP listener that counts connections: the gateway must never open one to it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("request_line", [
    "GET http://127.0.0.1:{port}/ HTTP/1.1",
    "CONNECT 127.0.0.1:{port} HTTP/1.1",
    "GET /desktop/ws01/../../x HTTP/1.1",
])
def test_requests_cannot_make_the_gateway_connect_elsewhere(gateway: GatewayRun, request_line: str) -> None:
    listener = Listener()
    try:
        line = request_line.format(port=listener.port)
        raw_request(gateway.listen_port, f"{line}\r\nHost: 127.0.0.1:{listener.port}\r\nConnection: close\r\n\r\n".encode())
        asyncio.run(asyncio.sleep(0.3))
        assert listener.connections == 0
    finally:
        listener.close()
