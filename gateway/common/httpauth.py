"""Small pieces every authenticated route shares: who is asking, and with which Basic credentials."""

from __future__ import annotations

import base64
import binascii
import hmac

from aiohttp import web

from gateway.common.frontdoor import FRONT_HEADER

__all__ = ["basic_credentials", "client_address", "FRONT_TOKEN_KEY"]

_LOOPBACK = frozenset({"127.0.0.1", "::1"})


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """(user, password) from an HTTP Basic Authorization header; None when there is none.

    A malformed header gives ("", ""), which no account or admin matches.
    """
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    user, _, password = decoded.partition(":")
    return user, password


#: The secret the gateway's private Apache adds to every request (see gateway.common.frontdoor); set on the
#: web app when that Apache is the front, so only its X-Forwarded-For is believed.
FRONT_TOKEN_KEY = web.AppKey("front_token", str)


def client_address(request: web.Request, *, behind_apache: bool) -> str:
    """The client's address, for rate limits and the audit log.

    Behind Apache every request comes from loopback and Apache appends the address it saw to
    X-Forwarded-For; anything before that entry came from the client and is not trusted. A request
    that reaches the gateway's port directly (without the private Apache's secret header) is judged
    by its own peer address.
    """
    peer = request.remote or "unknown"
    if behind_apache and peer in _LOOPBACK and _from_our_apache(request):
        forwarded = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
        if forwarded:
            return forwarded
    return peer


def _from_our_apache(request: web.Request) -> bool:
    expected = request.app.get(FRONT_TOKEN_KEY)
    if expected is None:  # no Apache in front (apache.mode none): nobody's X-Forwarded-For is believed
        return False
    return hmac.compare_digest(request.headers.get(FRONT_HEADER, "").encode(), expected.encode())
