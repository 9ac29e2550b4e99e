"""The organisers' credential (HTTP Basic), shared by every admin route: the cockpit, watch and the wall.

Participants' accounts never work here. Failed attempts are rate-limited per client address (a
minute's window), so the password cannot be guessed quickly.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field

from aiohttp import web

from gateway.common.httpauth import basic_credentials
from gateway.common.ratelimit import RateLimit
from gateway.web.context import client_address_of

__all__ = ["ADMIN_ACCESS", "AdminAccess", "check_admin", "MAX_FAILURES_PER_MINUTE"]

log = logging.getLogger("gateway.cockpit")

MAX_FAILURES_PER_MINUTE = 10


@dataclass(slots=True)
class AdminAccess:
    user: str
    password: str
    #: Failed admin sign-ins per client address.
    failures: RateLimit = field(default_factory=lambda: RateLimit(MAX_FAILURES_PER_MINUTE, 60.0))


ADMIN_ACCESS = web.AppKey("admin_access", AdminAccess)


def check_admin(request: web.Request) -> str:
    """The admin user name, or an HTTP error: 401 asks for credentials, 429 after too many failures."""
    access = request.app[ADMIN_ACCESS]
    address = client_address_of(request)
    if access.failures.blocked(address):
        raise web.HTTPTooManyRequests(text="Too many failed sign-ins; wait a minute.")
    user, password = basic_credentials(request) or ("", "")
    user_ok = hmac.compare_digest(user.encode(), access.user.encode())
    password_ok = hmac.compare_digest(password.encode(), access.password.encode())
    if user_ok and password_ok:
        return user
    if user or password:
        access.failures.add(address)
        log.warning("admin sign-in refused address=%s", address)
    raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="gateway admin", charset="UTF-8"'},
                               text="Admin credentials required.")
