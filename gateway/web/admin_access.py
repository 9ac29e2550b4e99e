"""The organisers' credential (HTTP Basic), shared by every admin route: the cockpit, watch and the wall.

Participants' accounts never work here. Failed attempts are rate-limited per client address (a
minute's window), but the right password is never refused: the organiser shares the venue's one
address (NAT) with every participant, and a participant typing wrong passwords must not lock the
organiser out. That is safe because the password cannot be guessed: a random one is made, and one
chosen by the organiser must be at least :data:`MIN_PASSWORD_LENGTH` characters (checked at start).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field

from aiohttp import web

from gateway.common.httpauth import basic_credentials
from gateway.common.ratelimit import RateLimit
from gateway.web.context import client_address_of

__all__ = ["ADMIN_ACCESS", "AdminAccess", "check_admin", "MAX_FAILURES_PER_MINUTE", "MIN_PASSWORD_LENGTH"]

log = logging.getLogger("gateway.cockpit")

MAX_FAILURES_PER_MINUTE = 10
#: An organiser's own admin password must be this long at least (the random one has 16 characters).
MIN_PASSWORD_LENGTH = 12


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
    user, password = basic_credentials(request) or ("", "")
    user_ok = hmac.compare_digest(user.encode(), access.user.encode())
    password_ok = hmac.compare_digest(password.encode(), access.password.encode())
    if user_ok and password_ok:
        return user
    if access.failures.blocked(address):
        raise web.HTTPTooManyRequests(text="Too many failed sign-ins; wait a minute.")
    if user or password:
        access.failures.add(address)
        log.warning("admin sign-in refused address=%s", address)
    raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="gateway admin", charset="UTF-8"'},
                               text="Admin credentials required.")
