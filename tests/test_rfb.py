"""Tests for gateway.common.rfb: pure protocol tests against scripted servers, and system tests against a
real TigerVNC Xvnc, directly and through a real websockify."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.common import proc
from gateway.common.rfb import (
    SECURITY_NONE,
    SECURITY_VNC_AUTH,
    RfbAuthFailed,
    RfbError,
    RfbSession,
    connect_tcp,
    connect_websocket,
    handshake,
    parse_banner,
    probe,
    read_banner,
)
from gateway.common.vncauth import vnc_auth_key, vnc_auth_response
from tests.system import free_port, require_program

PASSWORD = "secret12"
WRONG_PASSWORD = "not-it!!"
STARTUP_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0

# TigerVNC's fixed key for obfuscating password files (rfb/obfuscate.cxx), in VNC's own bit order.
VNCPASSWD_OBFUSCATION_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7]).decode("ascii")
# `printf 'secret12\n' | vncpasswd -f | xxd -p` with TigerVNC 1.12.0.
VNCPASSWD_SECRET12 = bytes.fromhex("24b5ae4ce15503c6")


def reverse_bits(byte: int) -> int:
    """Reverse the bit order of one byte, by shifting (independent of the module's lookup table)."""
    result = 0
    for _ in range(8):
        result = (result << 1) | (byte & 1)
        byte >>= 1
    return result


# --- pure unit tests: VncAuth ---------------------------------------------------------------------


def test_vnc_auth_key_reverses_bits_and_pads() -> None:
    expected = bytes(reverse_bits(b) for b in b"ab") + bytes(6)
    assert vnc_auth_key("ab") == expected
    assert vnc_auth_key("ab") == bytes([0x86, 0x46, 0, 0, 0, 0, 0, 0])


def test_vnc_auth_key_truncates_to_eight_bytes() -> None:
    assert vnc_auth_key("secret12-and-more") == vnc_auth_key("secret12")
    assert vnc_auth_key("") == bytes(8)


def test_vnc_auth_response_matches_standard_des_vector() -> None:
    # The classic DES example (FIPS 81): key 0123456789abcdef, "Now is t" -> 3fa40e8a984d4815.
    # DES ignores the lowest bit of each key byte (parity), so 0022446688aaccee is the same key; its
    # bit-reversed bytes are all ASCII, so a password can carry it through VncAuth's reversal.
    des_key = bytes.fromhex("0022446688aaccee")
    password = bytes(reverse_bits(b) for b in des_key).decode("ascii")
    assert password == '\x00D"f\x11U3w'
    assert vnc_auth_key(password) == des_key
    expected = bytes.fromhex("3fa40e8a984d4815")
    assert vnc_auth_response(password, b"Now is t" * 2) == expected * 2


def test_vnc_auth_response_matches_tigervnc_password_obfuscation() -> None:
    # vncpasswd obfuscates a password with the same DES (same bit order) that VncAuth uses, keyed by
    # a fixed ASCII key, so its output is an independent known vector for vnc_auth_response.
    challenge = b"secret12" * 2
    assert vnc_auth_response(VNCPASSWD_OBFUSCATION_KEY, challenge) == VNCPASSWD_SECRET12 * 2


def test_vnc_auth_response_known_vector_for_password() -> None:
    # Widely published: the VNC obfuscation of "password" is dbd83cfd727a1458.
    challenge = b"password" * 2
    assert vnc_auth_response(VNCPASSWD_OBFUSCATION_KEY, challenge) == bytes.fromhex("dbd83cfd727a1458") * 2


def test_vnc_auth_response_rejects_wrong_challenge_length() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        vnc_auth_response(PASSWORD, bytes(8))


# --- pure unit tests: banner ------------------------------------------------------------------------


def stream_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize(
    ("banner", "version"),
    [(b"RFB 003.008\n", "003.008"), (b"RFB 003.003\n", "003.003"), (b"RFB 003.889\n", "003.889")],
)
async def test_read_banner_good(banner: bytes, version: str) -> None:
    assert await read_banner(stream_of(banner)) == version


@pytest.mark.parametrize(
    "banner",
    [
        b"HTTP/1.1 400",  # a web server
        b"RFB 003.008\r",  # wrong terminator
        b"RFB 3.8.0000\n",
        b"rfb 003.008\n",
        b"RFB 003.00a\n",
        b"SSH-2.0-Open",
    ],
)
async def test_read_banner_bad(banner: bytes) -> None:
    with pytest.raises(RfbError, match="not an RFB server"):
        await read_banner(stream_of(banner))


async def test_read_banner_short_stream() -> None:
    with pytest.raises(RfbError, match="closed the connection"):
        await read_banner(stream_of(b"RFB 003"))


def test_parse_banner_exact_length_only() -> None:
    with pytest.raises(RfbError):
        parse_banner(b"RFB 003.008\nX")


# --- pure unit tests: handshake against scripted servers --------------------------------------------


class RecordingWriter:
    """A writer that records what the client sends."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        return None


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def rfb_string(text: str) -> bytes:
    data = text.encode()
    return u32(len(data)) + data


def server_init(width: int = 640, height: int = 480, name: str = "desk") -> bytes:
    return struct.pack(">HH", width, height) + bytes(16) + rfb_string(name)


CHALLENGE = bytes(range(16))


async def run_scripted(
    server_bytes: bytes, password: str | None, *, shared: bool = True
) -> tuple[RfbSession, bytes]:
    """Run handshake() against a server that sends ``server_bytes``; return the session and what was sent."""
    writer = RecordingWriter()
    session = await handshake(stream_of(server_bytes), writer, password, shared=shared)
    return session, bytes(writer.sent)


async def test_handshake_38_vnc_auth() -> None:
    script = b"RFB 003.008\n" + bytes([2, 1, 2]) + CHALLENGE + u32(0) + server_init(name="héllo")
    session, sent = await run_scripted(script, PASSWORD)
    assert session == RfbSession("003.008", SECURITY_VNC_AUTH, 640, 480, "héllo")
    assert sent == b"RFB 003.008\n" + bytes([2]) + vnc_auth_response(PASSWORD, CHALLENGE) + bytes([1])


async def test_handshake_38_none_when_no_password() -> None:
    script = b"RFB 003.008\n" + bytes([2, 2, 1]) + u32(0) + server_init()
    session, sent = await run_scripted(script, None, shared=False)
    assert session.security_type == SECURITY_NONE
    assert sent == b"RFB 003.008\n" + bytes([1]) + bytes([0])


async def test_handshake_37_none_has_no_security_result() -> None:
    script = b"RFB 003.007\n" + bytes([1, 1]) + server_init(800, 600)
    session, sent = await run_scripted(script, None)
    assert (session.version, session.width, session.height) == ("003.007", 800, 600)
    assert sent == b"RFB 003.007\n" + bytes([1]) + bytes([1])


async def test_handshake_33_vnc_auth() -> None:
    script = b"RFB 003.003\n" + u32(2) + CHALLENGE + u32(0) + server_init()
    session, sent = await run_scripted(script, PASSWORD)
    assert session.version == "003.003" and session.security_type == SECURITY_VNC_AUTH
    # 3.3: the server picks the type, the client sends no choice.
    assert sent == b"RFB 003.003\n" + vnc_auth_response(PASSWORD, CHALLENGE) + bytes([1])


async def test_handshake_33_none() -> None:
    script = b"RFB 003.003\n" + u32(1) + server_init()
    session, _ = await run_scripted(script, PASSWORD)
    assert session.security_type == SECURITY_NONE


async def test_handshake_unknown_newer_minor_answers_38() -> None:
    script = b"RFB 003.889\n" + bytes([1, 1]) + u32(0) + server_init()
    session, sent = await run_scripted(script, None)
    assert session.version == "003.008"
    assert sent.startswith(b"RFB 003.008\n")


async def test_handshake_auth_failure_carries_reason() -> None:
    script = b"RFB 003.008\n" + bytes([1, 2]) + CHALLENGE + u32(1) + rfb_string("Authentication failure")
    with pytest.raises(RfbAuthFailed) as caught:
        await run_scripted(script, WRONG_PASSWORD)
    assert caught.value.reason == "Authentication failure"
    assert "Authentication failure" in str(caught.value)


async def test_handshake_auth_failure_without_reason() -> None:
    script = b"RFB 003.008\n" + bytes([1, 2]) + CHALLENGE + u32(1)  # server hangs up instead
    with pytest.raises(RfbAuthFailed) as caught:
        await run_scripted(script, WRONG_PASSWORD)
    assert caught.value.reason == ""


async def test_handshake_33_auth_failure() -> None:
    script = b"RFB 003.003\n" + u32(2) + CHALLENGE + u32(1)
    with pytest.raises(RfbAuthFailed):
        await run_scripted(script, WRONG_PASSWORD)


@pytest.mark.parametrize(
    ("script", "password", "message"),
    [
        (b"RFB 003.008\n" + bytes([0]) + rfb_string("Too many security failures"), PASSWORD, "Too many"),
        (b"RFB 003.003\n" + u32(0) + rfb_string("go away"), PASSWORD, "go away"),
        (b"RFB 003.008\n" + bytes([1, 2]), None, "requires a password"),
        (b"RFB 003.003\n" + u32(2), None, "requires a password"),
        (b"RFB 003.008\n" + bytes([2, 16, 19]), PASSWORD, "no supported security type"),
        (b"RFB 003.003\n" + u32(16), PASSWORD, "unsupported security type"),
        (b"RFB 002.000\n", PASSWORD, "unsupported RFB protocol version"),
        (b"RFB 003.008\n" + bytes([1, 1]) + u32(0) + server_init()[:10], None, "ServerInit"),
        (b"RFB 003.008\n" + bytes([1, 1]) + u32(0) + bytes(20) + u32(1 << 30), None, "implausible"),
        (b"RFB 003.008\n" + bytes([1, 2]) + CHALLENGE[:5], PASSWORD, "challenge"),
    ],
    ids=["refused-38", "refused-33", "needs-password-38", "needs-password-33", "unknown-types",
         "unknown-type-33", "old-version", "short-serverinit", "huge-name", "short-challenge"],
)
async def test_handshake_protocol_errors(script: bytes, password: str | None, message: str) -> None:
    with pytest.raises(RfbError, match=message) as caught:
        await run_scripted(script, password)
    assert not isinstance(caught.value, RfbAuthFailed)


async def test_handshake_does_not_choose_a_type_it_cannot_do() -> None:
    writer = RecordingWriter()
    with pytest.raises(RfbError):
        await handshake(stream_of(b"RFB 003.008\n" + bytes([1, 2])), writer, None)
    assert bytes(writer.sent) == b"RFB 003.008\n"


# --- probe against local non-VNC listeners ------------------------------------------------------------


async def test_probe_refused_port_raises_oserror() -> None:
    with pytest.raises(OSError):
        await probe("127.0.0.1", free_port(), timeout_s=CONNECT_TIMEOUT_S)


async def test_probe_not_rfb_and_silent_servers() -> None:
    async def answer_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    for handler, expected in ((answer_http, RfbError), (say_nothing, TimeoutError)):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(expected):
                await probe("127.0.0.1", port, timeout_s=0.5)
        finally:
            server.close()
            await server.wait_closed()


# --- system tests: a real Xvnc, and a real websockify in front of it ----------------------------------


@dataclass(frozen=True, slots=True)
class VncServer:
    port: int
    display: int
    log_path: Path


async def read_display_number(read_fd: int, timeout_s: float) -> int:
    """Read the display number Xvnc writes to its -displayfd pipe once it is up; closes read_fd."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(read_fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        async with asyncio.timeout(timeout_s):
            line = await reader.readline()
    finally:
        transport.close()
    if not line.strip().isdigit():
        raise AssertionError(f"Xvnc wrote no display number to -displayfd (got {line!r})")
    return int(line)


async def wait_until(
    ready: Callable[[], Awaitable[bool]], process: asyncio.subprocess.Process, what: str, log_path: Path
) -> None:
    """Poll ``ready`` until it is true; fail with the program's log if it exits or takes too long."""
    async with asyncio.timeout(STARTUP_TIMEOUT_S):
        while not await ready():
            if process.returncode is not None:
                pytest.fail(f"{what} exited with status {process.returncode}:\n{log_path.read_text()}")
            await asyncio.sleep(0.05)


async def rfb_answers(port: int) -> bool:
    try:
        await probe("127.0.0.1", port, timeout_s=1.0)
    except (OSError, TimeoutError, RfbError):
        return False
    return True


async def tcp_accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def write_password_file(vncpasswd: str, path: Path, password: str) -> None:
    result = (await proc.run([vncpasswd, "-f"], input=f"{password}\n".encode(), timeout_s=10)).check()
    path.touch(mode=0o600)
    path.write_bytes(result.stdout)


@pytest.fixture
async def xvnc(tmp_path: Path) -> AsyncIterator[VncServer]:
    """A real Xvnc with VncAuth (password PASSWORD) and no blacklist, on a free port; stopped after."""
    xvnc_path = require_program("Xvnc")
    vncpasswd = require_program("vncpasswd")
    password_file = tmp_path / "vncpasswd"
    await write_password_file(vncpasswd, password_file, PASSWORD)
    port = free_port()
    log_path = tmp_path / "xvnc.log"
    argv = [
        xvnc_path, "-rfbport", str(port), "-rfbauth", str(password_file), "-SecurityTypes", "VncAuth",
        "-UseBlacklist=0", "-interface", "127.0.0.1", "-geometry", "800x600", "-depth", "24",
    ]
    read_fd, write_fd = os.pipe()
    try:
        process, identity = await proc.spawn([*argv, "-displayfd", str(write_fd)], pass_fds=(write_fd,),
                                             log_path=log_path)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # Xvnc has its own copy; ours would hide its exit from the reader
    try:
        display = await read_display_number(read_fd, STARTUP_TIMEOUT_S)
        await wait_until(lambda: rfb_answers(port), process, "Xvnc", log_path)
        yield VncServer(port, display, log_path)
    finally:
        await proc.terminate_group(identity, proc=process)


@pytest.fixture
async def websockify(xvnc: VncServer, tmp_path: Path) -> AsyncIterator[str]:
    """A real websockify relaying ws://127.0.0.1:PORT/ to the xvnc fixture; returns that URL."""
    ws_port = free_port()
    log_path = tmp_path / "websockify.log"
    argv = [sys.executable, "-m", "websockify", f"127.0.0.1:{ws_port}", f"127.0.0.1:{xvnc.port}"]
    process, identity = await proc.spawn(argv, log_path=log_path)
    try:
        await wait_until(lambda: tcp_accepts(ws_port), process, "websockify", log_path)
        yield f"ws://127.0.0.1:{ws_port}/"
    finally:
        # One process group holds the listener and its forked per-connection children.
        await proc.terminate_group(identity, proc=process)


@pytest.mark.system
async def test_probe_real_xvnc(xvnc: VncServer) -> None:
    assert await probe("127.0.0.1", xvnc.port, timeout_s=CONNECT_TIMEOUT_S) == "003.008"
    assert xvnc.display >= 0


@pytest.mark.system
async def test_right_password(xvnc: VncServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    session = await connect_tcp("127.0.0.1", xvnc.port, PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    assert (session.version, session.security_type) == ("003.008", SECURITY_VNC_AUTH)
    assert (session.width, session.height) == (800, 600)
    assert session.name
    assert PASSWORD not in caplog.text


@pytest.mark.system
async def test_password_is_truncated_to_eight_bytes(xvnc: VncServer) -> None:
    session = await connect_tcp("127.0.0.1", xvnc.port, PASSWORD + "-ignored", timeout_s=CONNECT_TIMEOUT_S)
    assert session.width == 800


@pytest.mark.system
async def test_wrong_password(xvnc: VncServer) -> None:
    with pytest.raises(RfbAuthFailed) as caught:
        await connect_tcp("127.0.0.1", xvnc.port, WRONG_PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    assert caught.value.reason  # TigerVNC says why ("Authentication failure")


@pytest.mark.system
async def test_no_password_against_vnc_auth_server(xvnc: VncServer) -> None:
    with pytest.raises(RfbError, match="requires a password"):
        await connect_tcp("127.0.0.1", xvnc.port, None, timeout_s=CONNECT_TIMEOUT_S)


@pytest.mark.system
async def test_wrong_attempts_do_not_lock_out_right_one(xvnc: VncServer) -> None:
    # Xvnc's blacklist would refuse 127.0.0.1 after 5 failures; -UseBlacklist=0 must prevent that.
    for _ in range(8):
        with pytest.raises(RfbAuthFailed):
            await connect_tcp("127.0.0.1", xvnc.port, WRONG_PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    session = await connect_tcp("127.0.0.1", xvnc.port, PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    assert (session.width, session.height) == (800, 600)


@pytest.mark.system
async def test_websocket_right_password(websockify: str) -> None:
    session = await connect_websocket(websockify, PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    assert session == RfbSession("003.008", SECURITY_VNC_AUTH, 800, 600, session.name)


@pytest.mark.system
async def test_websocket_wrong_password(websockify: str) -> None:
    with pytest.raises(RfbAuthFailed):
        await connect_websocket(websockify, WRONG_PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    # The tunnel still works for the next participant.
    session = await connect_websocket(websockify, PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    assert session.width == 800


@pytest.mark.system
async def test_websocket_to_dead_vnc_port_is_rfb_error(tmp_path: Path) -> None:
    # websockify accepts the websocket, fails to reach the target, and closes it.
    ws_port = free_port()
    log_path = tmp_path / "websockify.log"
    argv = [sys.executable, "-m", "websockify", f"127.0.0.1:{ws_port}", f"127.0.0.1:{free_port()}"]
    process, identity = await proc.spawn(argv, log_path=log_path)
    try:
        await wait_until(lambda: tcp_accepts(ws_port), process, "websockify", log_path)
        with pytest.raises(RfbError, match="closed the connection"):
            await connect_websocket(f"ws://127.0.0.1:{ws_port}/", PASSWORD, timeout_s=CONNECT_TIMEOUT_S)
    finally:
        await proc.terminate_group(identity, proc=process)


@pytest.mark.system
async def test_real_vncpasswd_matches_vnc_auth_des(tmp_path: Path) -> None:
    vncpasswd = require_program("vncpasswd")
    path = tmp_path / "passwd"
    await write_password_file(vncpasswd, path, "Workshop")
    obfuscated = path.read_bytes()
    assert len(obfuscated) == 8
    assert vnc_auth_response(VNCPASSWD_OBFUSCATION_KEY, b"Workshop" * 2) == obfuscated * 2
