"""A small asyncio RFB (VNC, RFC 6143) client: enough to check that a desktop really answers.

It does the client side of the handshake up to and including ServerInit, then stops:

* :func:`probe` only reads the server's 12-byte banner (a cheap readiness check);
* :func:`handshake` runs the whole handshake over any reader/writer pair;
* :func:`connect_tcp` and :func:`connect_websocket` open a connection, run :func:`handshake` and close
  it again. The websocket path goes through the same :func:`handshake` by way of a small adapter,
  so a desktop can be checked end to end through Apache and websockify.

The VncAuth answer itself (DES) is :mod:`gateway.common.vncauth`.

Passwords are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from gateway.common.vncauth import CHALLENGE_LEN, vnc_auth_response

__all__ = [
    "RfbError", "RfbAuthFailed", "RfbSession", "ByteReader", "ByteWriter", "SECURITY_NONE", "SECURITY_VNC_AUTH",
    "parse_banner", "read_banner", "probe", "handshake", "connect_tcp", "open_tcp", "RfbClient",
    "connect_websocket", "WebSocketStream", "Framebuffer", "read_framebuffer", "grab_tcp",
]

log = logging.getLogger("gateway.rfb")

SECURITY_INVALID = 0
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2

_BANNER_LEN = 12
_BANNER_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
_MAX_STRING_LEN = 1 << 16  # reason strings and desktop names; anything longer is not a VNC server
_CLOSE_TIMEOUT_S = 2.0


class RfbError(Exception):
    """The server broke the protocol, refused the connection, or closed it mid-handshake."""


class RfbAuthFailed(RfbError):
    """The server said that authentication failed; ``reason`` is its explanation ("" if none)."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(f"VNC authentication failed: {reason}" if reason else "VNC authentication failed")


@dataclass(frozen=True, slots=True)
class RfbSession:
    """What a completed handshake learnt about the server."""

    version: str  # the protocol version both sides agreed on, e.g. "003.008"
    security_type: int  # SECURITY_NONE or SECURITY_VNC_AUTH
    width: int
    height: int
    name: str


class ByteReader(Protocol):
    """The part of :class:`asyncio.StreamReader` that :func:`handshake` uses."""

    async def readexactly(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    """The part of :class:`asyncio.StreamWriter` that :func:`handshake` uses."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


# --- wire helpers --------------------------------------------------------------------------------


async def _read(reader: ByteReader, n: int, what: str) -> bytes:
    """Read exactly ``n`` bytes; raise RfbError naming ``what`` if the server closes first."""
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise RfbError(
            f"server closed the connection while sending {what} (got {len(exc.partial)} of {n} bytes)"
        ) from None


async def _read_u8(reader: ByteReader, what: str) -> int:
    return (await _read(reader, 1, what))[0]


async def _read_u32(reader: ByteReader, what: str) -> int:
    return int.from_bytes(await _read(reader, 4, what), "big")


async def _read_string(reader: ByteReader, what: str) -> str:
    """Read a U32 length followed by that many bytes, decoded as UTF-8 (invalid bytes replaced)."""
    length = await _read_u32(reader, f"the length of {what}")
    if length > _MAX_STRING_LEN:
        raise RfbError(f"server sent an implausible length for {what}: {length} bytes")
    return (await _read(reader, length, what)).decode(errors="replace")


async def _read_reason(reader: ByteReader) -> str:
    """Read a failure reason string; a server that closes instead of sending one gives ""."""
    try:
        return await _read_string(reader, "a failure reason")
    except RfbError:
        return ""


async def _send(writer: ByteWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


# --- handshake -----------------------------------------------------------------------------------


def parse_banner(banner: bytes) -> str:
    """Return the version ("003.008") from a ProtocolVersion message; raise RfbError if malformed."""
    match = _BANNER_RE.fullmatch(banner)
    if match is None:
        raise RfbError(f"not an RFB server: its first bytes were {banner!r}")
    return f"{match[1].decode()}.{match[2].decode()}"


async def read_banner(reader: ByteReader) -> str:
    """Read the server's 12-byte ProtocolVersion message.

    Returns the version, e.g. "003.008". Raises RfbError if the bytes are not ``RFB xxx.yyy\\n``
    or the server closes the connection before sending 12 bytes.
    """
    return parse_banner(await _read(reader, _BANNER_LEN, "its protocol version"))


def _client_version(server_version: str) -> str:
    """The version the client answers with: 3.8, 3.7, or 3.3 for anything older (RFC 6143 7.1.1)."""
    major, minor = (int(part) for part in server_version.split("."))
    if major < 3:
        raise RfbError(f"unsupported RFB protocol version {server_version}")
    if major > 3 or minor >= 8:
        return "003.008"
    if minor == 7:
        return "003.007"
    return "003.003"


def _choose_security(offered: Sequence[int], password: str | None) -> int:
    """Pick VncAuth when we have a password and it is offered, else None; raise RfbError if neither fits."""
    if password is not None and SECURITY_VNC_AUTH in offered:
        return SECURITY_VNC_AUTH
    if SECURITY_NONE in offered:
        return SECURITY_NONE
    if SECURITY_VNC_AUTH in offered:
        raise RfbError("the server requires a password (VncAuth) and none was given")
    raise RfbError(f"the server offers no supported security type (offered: {list(offered)})")


async def _negotiate_security(
    reader: ByteReader, writer: ByteWriter, version: str, password: str | None
) -> int:
    """Agree on a security type (RFC 6143 7.1.2) and return it."""
    if version == "003.003":
        chosen = await _read_u32(reader, "its security type")
        if chosen == SECURITY_INVALID:
            raise RfbError(f"server refused the connection: {await _read_reason(reader)}")
        if chosen not in (SECURITY_NONE, SECURITY_VNC_AUTH):
            raise RfbError(f"the server demands unsupported security type {chosen}")
        return chosen
    count = await _read_u8(reader, "the number of security types")
    if count == 0:
        raise RfbError(f"server refused the connection: {await _read_reason(reader)}")
    offered = list(await _read(reader, count, "its security types"))
    chosen = _choose_security(offered, password)
    await _send(writer, bytes([chosen]))
    return chosen


async def _vnc_auth(reader: ByteReader, writer: ByteWriter, password: str) -> None:
    challenge = await _read(reader, CHALLENGE_LEN, "the VncAuth challenge")
    await _send(writer, vnc_auth_response(password, challenge))


async def _check_security_result(reader: ByteReader, version: str) -> None:
    """Read SecurityResult; raise RfbAuthFailed (with the 3.8 reason string) if it is not OK."""
    result = await _read_u32(reader, "the security result")
    if result == 0:
        return
    reason = await _read_reason(reader) if version == "003.008" else ""
    raise RfbAuthFailed(reason)


async def _initialise(reader: ByteReader, writer: ByteWriter, shared: bool) -> tuple[int, int, str]:
    """Send ClientInit and parse ServerInit; return (width, height, desktop name)."""
    await _send(writer, bytes([1 if shared else 0]))
    width, height, _pixel_format = struct.unpack(">HH16s", await _read(reader, 20, "ServerInit"))
    name = await _read_string(reader, "the desktop name")
    return width, height, name


async def handshake(
    reader: ByteReader,
    writer: ByteWriter,
    password: str | None,
    *,
    shared: bool = True,
) -> RfbSession:
    """Run the client side of the RFB handshake, from the server's banner to ServerInit.

    Answers with version 3.8 (3.7 or 3.3 to older servers), uses VncAuth when ``password`` is
    given and offered (otherwise security type None), and asks for a shared session unless
    ``shared`` is False. The stream is left open, positioned just after ServerInit.

    Returns an :class:`RfbSession`. Raises RfbAuthFailed if the server rejects the password,
    RfbError for any other protocol problem (bad banner, refused connection, no usable security
    type, the server closing early); OSError from the transport passes through. It sets no
    deadline of its own: wrap it in ``asyncio.timeout``.
    """
    version = _client_version(await read_banner(reader))
    await _send(writer, f"RFB {version}\n".encode())
    security_type = await _negotiate_security(reader, writer, version, password)
    if security_type == SECURITY_VNC_AUTH:
        if password is None:  # only a 3.3 server can impose VncAuth on us
            raise RfbError("the server requires a password (VncAuth) and none was given")
        await _vnc_auth(reader, writer, password)
    if security_type == SECURITY_VNC_AUTH or version == "003.008":
        await _check_security_result(reader, version)
    width, height, name = await _initialise(reader, writer, shared)
    log.debug("rfb handshake done version=%s security=%d size=%dx%d", version, security_type, width, height)
    return RfbSession(version, security_type, width, height, name)


# --- TCP -----------------------------------------------------------------------------------------


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a TCP stream, waiting briefly for the close to finish; never raises OSError or TimeoutError."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await writer.wait_closed()


async def probe(host: str, port: int, *, timeout_s: float) -> str:
    """Check that an RFB server listens on ``host:port``: connect, read its banner, close.

    Returns the server's protocol version, e.g. "003.008". Raises OSError if the connection
    fails, TimeoutError if it takes longer than ``timeout_s`` in all, RfbError if what answers
    is not an RFB server.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with asyncio.timeout_at(deadline):
        reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout_at(deadline):
            return await read_banner(reader)
    finally:
        await _close_writer(writer)


async def connect_tcp(host: str, port: int, password: str | None, *, timeout_s: float) -> RfbSession:
    """Connect to ``host:port``, run :func:`handshake`, then close the connection.

    Returns the :class:`RfbSession`. Raises RfbAuthFailed or RfbError as :func:`handshake` does,
    OSError if the connection fails, TimeoutError if connecting and the handshake together take
    longer than ``timeout_s``.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with asyncio.timeout_at(deadline):
        reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout_at(deadline):
            return await handshake(reader, writer, password)
    finally:
        await _close_writer(writer)


@dataclass(slots=True)
class RfbClient:
    """An open, authenticated RFB connection that can send input (used by tests and instructor tools)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    session: RfbSession

    async def pointer_event(self, x: int, y: int, buttons: int = 0) -> None:
        await _send(self.writer, struct.pack(">BBHH", 5, buttons, x, y))

    async def key_event(self, keysym: int, down: bool) -> None:
        await _send(self.writer, struct.pack(">BBxxI", 4, 1 if down else 0, keysym))


@contextlib.asynccontextmanager
async def open_tcp(host: str, port: int, password: str | None, *, timeout_s: float):  # type: ignore[no-untyped-def]
    """Connect and authenticate like :func:`connect_tcp`, but keep the connection open as an
    :class:`RfbClient` for the body of the ``async with``; it is closed afterwards."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with asyncio.timeout_at(deadline):
        reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout_at(deadline):
            session = await handshake(reader, writer, password)
        yield RfbClient(reader, writer, session)
    finally:
        await _close_writer(writer)


# --- websocket -----------------------------------------------------------------------------------


_WS_END = frozenset(
    {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}
)


class WebSocketStream:
    """Presents an aiohttp client websocket as the reader/writer pair :func:`handshake` expects.

    Incoming binary messages are concatenated into one byte stream; writes are buffered and sent
    as one binary message by :meth:`drain`. A closed websocket reads as end of stream.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._received = bytearray()
        self._pending = bytearray()

    async def readexactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes; raise asyncio.IncompleteReadError if the websocket closes first."""
        while len(self._received) < n:
            self._received += await self._receive_chunk(n)
        data = bytes(self._received[:n])
        del self._received[:n]
        return data

    async def _receive_chunk(self, n: int) -> bytes:
        while True:
            msg = await self._ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                return msg.data
            if msg.type == aiohttp.WSMsgType.TEXT:
                raise RfbError("the websocket peer sent a text message; expected binary RFB data")
            if msg.type in _WS_END:
                raise asyncio.IncompleteReadError(bytes(self._received), n)
            # PING/PONG and other control frames carry no RFB data.

    def write(self, data: bytes) -> None:
        self._pending += data

    async def drain(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await self._ws.send_bytes(data)


async def _close_websocket(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Send a close frame and wait briefly for the answer; never raises on a broken connection."""
    with contextlib.suppress(OSError, TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await ws.close()


async def connect_websocket(
    url: str,
    password: str | None,
    *,
    timeout_s: float,
    ssl: Any = None,
    headers: Mapping[str, str] | None = None,
) -> RfbSession:
    """Open a websocket to ``url`` (subprotocol "binary", as noVNC does), run :func:`handshake`, close.

    This checks the whole chain a browser uses (Apache, websockify, VNC server). ``ssl`` is passed
    to aiohttp (an SSLContext, or False to skip certificate checks); ``headers`` are added to the
    upgrade request.

    Returns the :class:`RfbSession`. Raises RfbAuthFailed or RfbError as :func:`handshake` does
    (a proxy that closes the websocket because the VNC server is unreachable shows as RfbError),
    aiohttp.ClientError if the websocket cannot be opened (connection refused, or an HTTP answer
    other than the upgrade, e.g. 404 or 502), TimeoutError if everything takes longer than
    ``timeout_s``.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    ssl_kwargs: dict[str, Any] = {} if ssl is None else {"ssl": ssl}
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout_at(deadline):
            ws = await http.ws_connect(url, protocols=("binary",), headers=headers, **ssl_kwargs)
        try:
            stream = WebSocketStream(ws)
            async with asyncio.timeout_at(deadline):
                return await handshake(stream, stream, password)
        finally:
            await _close_websocket(ws)


# --- framebuffer grab (thumbnails) ----------------------------------------------------------------

#: 32 bits per pixel, depth 24, little-endian true colour with red in the lowest byte: each pixel
#: arrives as the bytes R, G, B, X (Pillow's "RGBX").
_PIXEL_FORMAT_RGBX = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
_ENCODING_RAW = 0
#: Larger desktops than this are refused rather than buffered (about 64 MB of pixels).
MAX_GRAB_PIXELS = 4096 * 4096


@dataclass(frozen=True, slots=True)
class Framebuffer:
    """A whole screen: ``pixels`` holds width * height * 4 bytes, R G B X per pixel, row by row."""

    width: int
    height: int
    pixels: bytes


async def read_framebuffer(
    reader: ByteReader, writer: ByteWriter, session: RfbSession, *, max_pixels: int = MAX_GRAB_PIXELS
) -> Framebuffer:
    """Ask for the whole screen in Raw encoding and read it (after :func:`handshake`).

    Sends SetPixelFormat (32 bpp true colour), SetEncodings (Raw only) and one non-incremental
    FramebufferUpdateRequest, then reads server messages until every pixel has been covered.
    Bell, colour map and clipboard messages in between are skipped. Raises RfbError for a screen
    larger than ``max_pixels``, a rectangle outside the screen or an encoding other than Raw. It
    sets no deadline of its own: wrap it in ``asyncio.timeout``.
    """
    width, height = session.width, session.height
    if width * height > max_pixels or width == 0 or height == 0:
        raise RfbError(f"refusing to grab a {width}x{height} screen (limit {max_pixels} pixels)")
    writer.write(b"\x00\x00\x00\x00" + _PIXEL_FORMAT_RGBX)
    writer.write(struct.pack(">BxHi", 2, 1, _ENCODING_RAW))
    await _send(writer, struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
    pixels = bytearray(width * height * 4)
    covered = 0
    while covered < width * height:
        kind = await _read_u8(reader, "a server message")
        if kind == 0:  # FramebufferUpdate
            (count,) = struct.unpack(">xH", await _read(reader, 3, "a framebuffer update"))
            for _ in range(count):
                x, y, w, h, encoding = struct.unpack(">HHHHi", await _read(reader, 12, "a rectangle header"))
                if encoding != _ENCODING_RAW:
                    raise RfbError(f"the server sent encoding {encoding}; only Raw (0) was asked for")
                if x + w > width or y + h > height:
                    raise RfbError(f"the server sent a rectangle outside the screen: {w}x{h}+{x}+{y}")
                data = await _read(reader, w * h * 4, "rectangle pixels")
                row = w * 4
                for line in range(h):
                    start = ((y + line) * width + x) * 4
                    pixels[start:start + row] = data[line * row:(line + 1) * row]
                covered += w * h
        elif kind == 1:  # SetColourMapEntries: meaningless in true colour, skip it
            _, count = struct.unpack(">xHH", await _read(reader, 5, "a colour map"))
            await _read(reader, 6 * count, "colour map entries")
        elif kind == 2:  # Bell
            continue
        elif kind == 3:  # ServerCutText
            length = struct.unpack(">3xI", await _read(reader, 7, "a clipboard header"))[0]
            if length > _MAX_STRING_LEN * 256:
                raise RfbError(f"server sent an implausible clipboard length: {length} bytes")
            await _read(reader, length, "clipboard text")
        else:
            raise RfbError(f"unexpected server message type {kind}")
    return Framebuffer(width, height, bytes(pixels))


async def grab_tcp(
    host: str, port: int, password: str | None, *, timeout_s: float, max_pixels: int = MAX_GRAB_PIXELS
) -> Framebuffer:
    """Connect (shared, so nobody is disconnected), grab the whole screen once, and close.

    Raises what :func:`connect_tcp` and :func:`read_framebuffer` raise; TimeoutError when
    everything together takes longer than ``timeout_s``.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with asyncio.timeout_at(deadline):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        async with asyncio.timeout_at(deadline):
            session = await handshake(reader, writer, password, shared=True)
            return await read_framebuffer(reader, writer, session, max_pixels=max_pixels)
    finally:
        await _close_writer(writer)
