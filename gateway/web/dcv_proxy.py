"""``/dcv/ACCOUNT/...``: a participant's NICE DCV session, through the gateway, after signing in.

Routes (added to the gateway's aiohttp app; Apache forwards ``/dcv/`` here, websockets included):

- ``/dcv/ACCOUNT/PATH`` (any method, and websocket upgrades): reverse proxy to the DCV web server of
  ACCOUNT's session, i.e. ``dcv.scheme://NODE:PORT`` + ``dcv.web_url_path`` + ``PATH``.
- ``GET /dcv/ACCOUNT.dcv``: the connection file for DCV's native client (host, port, session id,
  user; never a password).

Both are served only to the participant of ACCOUNT: signed in (the session cookie of
:mod:`gateway.web.sessions`) or sending ACCOUNT's id and password as HTTP Basic credentials. Any
other account's credentials get 403, and so does a cross-site request (Sec-Fetch-Site, Origin). The target is exactly the endpoint the supervisor registered for
that account (its slot, once ready with protocol "dcv"); no host, port or path prefix comes from the
request. The gateway's own credentials and cookies are not passed on to DCV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from gateway.backends.dcv_access import connection_file, upstream_ssl, web_url_path
from gateway.model.config import Config
from gateway.model.status import DesktopSlot, Phase
from gateway.web.context import CONFIG, SLOTS
from gateway.web.sessions import CSRF_COOKIE, SESSION_COOKIE, authenticated_slot

__all__ = ["add_dcv_routes", "DCV_PREFIX"]

log = logging.getLogger("gateway.dcv_proxy")

DCV_PREFIX = "/dcv/"
REALM = "DCV session"
CONNECT_TIMEOUT_S = 10.0
READ_CHUNK = 64 * 1024

HTTP_CLIENT = web.AppKey("dcv_http_client", aiohttp.ClientSession)

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
#: Never sent to DCV: the gateway's credentials, and what the websocket handshake sets itself.
_NOT_FORWARDED = _HOP_BY_HOP | {"authorization", "cookie", "sec-websocket-key", "sec-websocket-version",
                                "sec-websocket-extensions", "sec-websocket-protocol", "sec-websocket-accept"}
_GATEWAY_COOKIES = frozenset({SESSION_COOKIE, CSRF_COOKIE})


def add_dcv_routes(app: web.Application) -> None:
    """Add the DCV routes (see the module docstring). The app needs the participants' sessions."""
    app.cleanup_ctx.append(_http_client)
    app.router.add_get(DCV_PREFIX + "{account}.dcv", connection_file_download)
    app.router.add_get(DCV_PREFIX + "{account}", _add_slash)
    app.router.add_route("*", DCV_PREFIX + "{account}/{tail:.*}", proxy)


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    # Bodies pass through as DCV encoded them; no cookies are kept between participants.
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                     cookie_jar=aiohttp.DummyCookieJar()) as http:
        app[HTTP_CLIENT] = http
        yield


def _own_slot(request: web.Request) -> DesktopSlot:
    """The slot of the account in the path, if the request is authenticated as that account."""
    wanted = request.match_info["account"]
    slot = request.app[SLOTS].get(wanted)
    if slot is None:
        raise web.HTTPNotFound(text="No such account.")
    own = authenticated_slot(request, realm=REALM)
    if own.account.id != wanted:
        log.warning("DCV route refused: account=%s asked for another account's session", own.account.id)
        raise web.HTTPForbidden(text="This is not your session.")
    return slot


def _ready_dcv(slot: DesktopSlot) -> None:
    if slot.protocol != "dcv":
        raise web.HTTPNotFound(text=f"Account {slot.account.id} has a VNC desktop, not a DCV session: "
                                    f"open view/{slot.account.id} instead.")
    if slot.phase is not Phase.READY or slot.endpoint is None:
        raise web.HTTPServiceUnavailable(text="Your DCV session is not ready yet; try again in a moment.",
                                         headers={"Retry-After": "5"})


def refuse_cross_site(request: web.Request) -> None:
    """403 for what another site's page makes a participant's browser send (it may carry their cookie
    or cached Basic credentials): ``Sec-Fetch-Site: cross-site``, or an Origin other than the host the
    browser asked for (as Apache forwarded it, or as the gateway was reached)."""
    if request.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
        log.warning("DCV route refused a cross-site request (Sec-Fetch-Site)")
        raise web.HTTPForbidden(text="Cross-site requests to DCV sessions are refused.")
    origin = request.headers.get("Origin")
    if origin is not None and _origin_host(origin) not in _own_hosts(request):
        log.warning("DCV route refused a request from another origin")
        raise web.HTTPForbidden(text="Requests from other sites to DCV sessions are refused.")


def _origin_host(origin: str) -> str:
    """host[:port] of an Origin header, without the scheme's default port; "" if it is not one."""
    try:
        url = URL(origin.strip())
    except ValueError:
        return ""
    if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
        return ""
    return _host_key(url.host, url.explicit_port if url.explicit_port not in (80, 443) else None)


def _own_hosts(request: web.Request) -> set[str]:
    """The host[:port] names this request reached the gateway by (Host; Apache's X-Forwarded-Host)."""
    names = {request.headers.get("Host", "")}
    if request.remote in ("127.0.0.1", "::1"):
        names.add(request.headers.get("X-Forwarded-Host", "").rsplit(",", 1)[-1])
    hosts = set()
    for name in filter(None, (n.strip() for n in names)):
        try:
            url = URL(f"http://{name}/")
        except ValueError:
            continue
        if url.host:
            hosts.add(_host_key(url.host, url.explicit_port if url.explicit_port not in (80, 443) else None))
    return hosts


def _host_key(host: str, port: int | None) -> str:
    host = host.lower().strip("[]")
    return f"{host}:{port}" if port else host


async def _add_slash(request: web.Request) -> web.StreamResponse:
    refuse_cross_site(request)
    _own_slot(request)
    raise web.HTTPFound(f"{request.match_info['account']}/")


async def connection_file_download(request: web.Request) -> web.Response:
    refuse_cross_site(request)
    slot = _own_slot(request)
    _ready_dcv(slot)
    assert slot.endpoint is not None
    try:
        text = connection_file(host=slot.endpoint.host, port=slot.endpoint.port,
                               session_id=slot.detail.get("session_id", ""), user=slot.detail.get("user", ""))
    except ValueError as exc:
        log.error("no .dcv file account=%s reason=%s", slot.account.id, exc)
        raise web.HTTPServiceUnavailable(text="The connection file cannot be made yet.") from None
    log.info("DCV connection file downloaded account=%s", slot.account.id)
    return web.Response(text=text, content_type="application/x-dcv", headers={
        "Content-Disposition": f'attachment; filename="{slot.account.id}.dcv"',
        "Cache-Control": "private, no-store",
    })


def _upstream_url(request: web.Request, slot: DesktopSlot) -> URL:
    """DCV's URL for this request: the registered endpoint, the account's web-url-path, the path tail."""
    assert slot.endpoint is not None
    config: Config = request.app[CONFIG]
    prefix = f"{DCV_PREFIX}{slot.account.id}/"
    raw_path = request.rel_url.raw_path
    if not raw_path.startswith(prefix):  # the account id needed no escaping, so this holds
        raise web.HTTPNotFound()
    tail = raw_path[len(prefix):]
    lowered = tail.lower()
    segments = request.match_info["tail"].split("/")
    if "%2f" in lowered or "%5c" in lowered or "\\" in tail or ".." in segments or "." in segments:
        raise web.HTTPBadRequest(text="Unsupported path.")
    host = slot.endpoint.host
    return URL.build(scheme=config.dcv.scheme, host=f"[{host}]" if ":" in host else host,
                     port=slot.endpoint.port, path=web_url_path(config, slot.account.id) + tail,
                     query_string=request.rel_url.raw_query_string, encoded=True)


def _forward_headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    kept = [f"{k}={m.value}" for k, m in request.cookies.items() if k not in _GATEWAY_COOKIES] \
        if request.headers.get("Cookie") else []
    if kept:
        headers["Cookie"] = "; ".join(kept)
    forwarded = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{forwarded}, {request.remote}" if forwarded else str(request.remote)
    return headers


async def proxy(request: web.Request) -> web.StreamResponse:
    refuse_cross_site(request)
    slot = _own_slot(request)
    _ready_dcv(slot)
    url = _upstream_url(request, slot)
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _proxy_websocket(request, slot, url)
    return await _proxy_http(request, slot, url)


async def _proxy_http(request: web.Request, slot: DesktopSlot, url: URL) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    http = request.app[HTTP_CLIENT]
    body = await request.read() if request.body_exists else None
    try:
        upstream = await http.request(request.method, url, headers=_forward_headers(request), data=body,
                                      allow_redirects=False, ssl=upstream_ssl(config))
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        log.warning("DCV web server does not answer account=%s error=%s", slot.account.id, exc)
        raise web.HTTPBadGateway(text="Your DCV session does not answer.") from None
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                response.headers.add(name, value)
        location = upstream.headers.get("Location")
        if location is not None:
            response.headers["Location"] = _public_location(location, url, slot, config)
        response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'self'")
        response.headers.setdefault("Cache-Control", "private")
        if upstream.headers.get("Content-Length") is not None:
            response.content_length = int(upstream.headers["Content-Length"])
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(READ_CHUNK):
            await response.write(chunk)
        await response.write_eof()
    return response


def _public_location(location: str, url: URL, slot: DesktopSlot, config: Config) -> str:
    """A redirect inside the DCV web server, as the participant's browser must follow it."""
    upstream_prefix = web_url_path(config, slot.account.id)
    target = URL(location)
    if target.is_absolute():
        if (target.host, target.port) != (url.host, url.port):
            return location
        target = target.relative()
    if target.raw_path.startswith(upstream_prefix):
        rest = target.raw_path[len(upstream_prefix):]
        public = f"{DCV_PREFIX}{slot.account.id}/{rest}"
        return public + (f"?{target.raw_query_string}" if target.raw_query_string else "")
    return location


async def _proxy_websocket(request: web.Request, slot: DesktopSlot, url: URL) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    http = request.app[HTTP_CLIENT]
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    try:
        upstream = await http.ws_connect(ws_url, protocols=protocols, headers=_forward_headers(request),
                                         ssl=upstream_ssl(config), max_msg_size=0, autoping=True)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        log.warning("DCV websocket refused account=%s error=%s", slot.account.id, exc)
        raise web.HTTPBadGateway(text="Your DCV session does not answer.") from None
    ws = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (), max_msg_size=0)
    try:
        await ws.prepare(request)
        slot.viewers += 1
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pump(ws, upstream))
                group.create_task(_pump(upstream, ws))
        except* _Closed:
            pass
        finally:
            slot.viewers -= 1
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            await ws.close()
    return ws


class _Closed(Exception):
    """One side of a websocket closed: end both."""


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    async for msg in source:
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        else:
            break
    raise _Closed
