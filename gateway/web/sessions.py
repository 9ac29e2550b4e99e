"""Participants' sessions, shared by the routes that need one: sign-up, sign-in, files, DCV, the pages.

The web-session key (random, 0600 in the state dir, kept across restarts) signs the session cookie,
the sign-up cookie and the forms' CSRF tokens. A session cookie holds the account, its expiry and an
HMAC over both and the password's hash, so a new token file ends old sessions. Every form carries a
CSRF token tied to a random cookie (double submit). Cookies are HttpOnly and SameSite=Strict, Secure
when the gateway is served over https. Failed sign-ins are rate-limited per client address (behind the
gateway's Apache: the address Apache appended to X-Forwarded-For), whichever route they came by.
Passwords are compared with ``hmac.compare_digest`` and never logged or stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.common.files import ensure_private_dir, read_or_create_secret
from gateway.common.httpauth import basic_credentials
from gateway.common.ratelimit import RateLimit
from gateway.model.config import Config
from gateway.model.signups import claims
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.web.context import SLOTS, client_address_of, find_slot, render_page
from gateway.web.terms import TermsDocument

__all__ = [
    "PARTICIPANTS", "Participants", "make_participants", "load_session_key", "SESSION_COOKIE", "CSRF_COOKIE",
    "SIGNUP_COOKIE", "MAX_PASSWORD", "set_cookie", "render_form_page", "read_form", "session_cookie",
    "session_account", "signin_allowed", "verified_slot", "authenticated_slot", "too_many", "free_accounts",
    "fields_with_control_characters", "control_message",
]

log = logging.getLogger("gateway.participant")

SESSION_COOKIE = "gw_session"
CSRF_COOKIE = "gw_csrf"
SIGNUP_COOKIE = "gw_signup"
CSRF_LIFETIME_S = 4 * 3600
MAX_FORM_BYTES = 32 * 1024
MAX_PASSWORD = 256
SESSION_KEY_BYTES = 32
#: Control characters (C0, DEL, C1), line/paragraph separators and bidirectional overrides: refused
#: in every field (they forge log lines, CSV rows and what an organiser reads in `accounts list`).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FIELD_LABELS = {"name": "your name", "email": "your e-mail address", "event_code": "the event code",
                 "account": "the account", "password": "the password"}
_HEX_DIGITS = frozenset(string.hexdigits.encode())


@dataclass(slots=True)
class Participants:
    """The participants' routes' shared state (one per app, under :data:`PARTICIPANTS`)."""

    config: Config
    store: StateStore
    state_dir: Path
    secret: bytes
    documents: tuple[TermsDocument, ...]
    signups: RateLimit
    #: Sign-up requests from all addresses together (many addresses must not exhaust the accounts).
    all_signups: RateLimit
    #: Failed sign-ins per (client address, account): a room behind one NAT is one address.
    signin_failures: RateLimit
    #: Failed sign-ins per client address, all accounts together (guessing across accounts).
    signin_address_failures: RateLimit

    @property
    def secure(self) -> bool:
        return self.config.tls.enabled or (self.config.public_url or "").startswith("https://")

    def sign(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "|".join(parts).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")


PARTICIPANTS = web.AppKey("participants", Participants)


def make_participants(config: Config, store: StateStore, state_dir: Path,
                      documents: tuple[TermsDocument, ...]) -> Participants:
    r = config.registration
    return Participants(
        config=config, store=store, state_dir=state_dir, secret=load_session_key(state_dir), documents=documents,
        signups=RateLimit(r.signup_attempts, r.signup_window_s),
        all_signups=RateLimit(r.signup_global_attempts, r.signup_global_window_s),
        signin_failures=RateLimit(r.signin_failures, r.signin_window_s),
        signin_address_failures=RateLimit(r.signin_failures_per_address, r.signin_window_s),
    )


def load_session_key(state_dir: Path) -> bytes:
    """The key that signs cookies and form tokens: random, 0600, kept across restarts.

    It is kept as hex text. A key file of raw bytes, as gateways before the hex format wrote it, is
    still used as it is, so that an upgrade keeps the participants' sessions."""
    path = ensure_private_dir(state_dir / "secrets") / "web-session.key"
    try:
        kept = path.read_bytes()
    except FileNotFoundError:
        kept = b""
    text = kept.strip()
    hex_key = set(text) <= _HEX_DIGITS and len(text) % 2 == 0 and len(text) >= 2 * SESSION_KEY_BYTES
    if not hex_key and len(kept) >= SESSION_KEY_BYTES:
        return kept  # raw bytes
    if kept and not hex_key:  # too short to be a key: a new one, as for a missing file
        path.unlink()
    return bytes.fromhex(read_or_create_secret(path, lambda: secrets.token_hex(SESSION_KEY_BYTES)))


def set_cookie(response: web.StreamResponse, p: Participants, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Strict", secure=p.secure)


# -- forms: CSRF and control characters ----------------------------------------------------------------


def _csrf_token(request: web.Request, response_cookies: dict[str, str]) -> str:
    p = request.app[PARTICIPANTS]
    nonce = request.cookies.get(CSRF_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{22,64}", nonce):
        nonce = secrets.token_urlsafe(18)
        response_cookies[CSRF_COOKIE] = nonce
    issued = str(int(time.time()))
    return f"{issued}.{p.sign('csrf', nonce, issued)}"


def _csrf_ok(request: web.Request, token: str) -> bool:
    p = request.app[PARTICIPANTS]
    nonce = request.cookies.get(CSRF_COOKIE, "")
    issued, _, mac = token.partition(".")
    if not nonce or not issued.isdigit() or not 0 <= time.time() - int(issued) <= CSRF_LIFETIME_S:
        return False
    return hmac.compare_digest(mac.encode(), p.sign("csrf", nonce, issued).encode())


def render_form_page(request: web.Request, template: str, *, status: int = 200, **context: object) -> web.Response:
    """A participant's page (at the gateway's root) with a fresh CSRF token for its forms."""
    cookies: dict[str, str] = {}
    csrf = _csrf_token(request, cookies)
    response = render_page(request, template, "./", csrf=csrf, **context)
    response.set_status(status)
    for name, value in cookies.items():
        set_cookie(response, request.app[PARTICIPANTS], name, value, None)
    return response


async def read_form(request: web.Request) -> Mapping[str, str]:
    """The posted form's text fields; 413 when too large, 403 when its CSRF token is not genuine."""
    if request.content_length is None or request.content_length > MAX_FORM_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_FORM_BYTES, actual_size=request.content_length or 0)
    data = await request.post()
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    if not _csrf_ok(request, form.get("csrf", "")):
        raise web.HTTPForbidden(text="This form has expired or did not come from this site. "
                                     "Reload the page and try again.")
    return form


def fields_with_control_characters(form: Mapping[str, str]) -> list[str]:
    """The form's fields (by name) that hold a control character, before anything is stripped."""
    return [key for key, value in form.items() if _CONTROL_RE.search(key) or _CONTROL_RE.search(value)]


def control_message(fields: list[str]) -> str:
    labels = [_FIELD_LABELS.get(f, "a field") for f in fields if not _CONTROL_RE.search(f)] or ["a field"]
    return ("Please remove the control characters (line breaks, tabs and the like) from "
            + ", ".join(dict.fromkeys(labels)) + ".")


# -- passwords and sessions ---------------------------------------------------------------------------


def too_many(seconds: float, what: str) -> web.HTTPTooManyRequests:
    wait = max(1, int(seconds + 0.999))
    return web.HTTPTooManyRequests(text=f"Too many {what} from your address; try again in {wait} s.",
                                   headers={"Retry-After": str(wait)})


def _signin_keys(request: web.Request, account: str) -> tuple[str, str]:
    """The client's address, and the address with the account it tries (case and spaces ignored)."""
    address = client_address_of(request)
    return address, f"{address} {account.strip().lower()[:64]}"


def signin_allowed(request: web.Request, account: str) -> None:
    """Raises 429 while the client's address has too many failed sign-ins for ``account``, or for all
    accounts together. Per account first: a venue's Wi-Fi is one address behind NAT, and one
    participant's typos (or one guesser) must not lock the others out of their own accounts."""
    p = request.app[PARTICIPANTS]
    address, key = _signin_keys(request, account)
    wait = max(p.signin_failures.blocked(key), p.signin_address_failures.blocked(address))
    if wait:
        raise too_many(wait, "failed sign-ins")


def verified_slot(request: web.Request, account: str, password: str) -> DesktopSlot | None:
    """The account named ``account`` if ``password`` is its password; a failure counts for the address."""
    slot = find_slot(request.app[SLOTS], account)
    expected = slot.account.password if slot is not None else secrets.token_hex(8)
    ok = hmac.compare_digest(password[:MAX_PASSWORD].encode(), expected.encode())
    if ok and slot is not None:
        return slot
    p = request.app[PARTICIPANTS]
    address, key = _signin_keys(request, account)
    p.signin_failures.add(key)
    p.signin_address_failures.add(address)
    return None


def session_cookie(p: Participants, slot: DesktopSlot) -> str:
    expires = str(int(time.time() + p.config.registration.session_lifetime_s))
    # The password's hash is in the signature: a new token file ends old sessions.
    fingerprint = hashlib.sha256(slot.account.password.encode()).hexdigest()
    return f"{slot.account.id}:{expires}:{p.sign('session', slot.account.id, expires, fingerprint)}"


def session_account(request: web.Request) -> DesktopSlot | None:
    """The signed-in participant's account (None: not signed in, or sign-in is not offered)."""
    if PARTICIPANTS not in request.app:
        return None
    p = request.app[PARTICIPANTS]
    account, _, rest = request.cookies.get(SESSION_COOKIE, "").partition(":")
    expires, _, mac = rest.partition(":")
    slot = request.app[SLOTS].get(account)
    if slot is None or not expires.isdigit() or int(expires) < time.time():
        return None
    fingerprint = hashlib.sha256(slot.account.password.encode()).hexdigest()
    if not hmac.compare_digest(mac.encode(), p.sign("session", account, expires, fingerprint).encode()):
        return None
    return slot


def authenticated_slot(request: web.Request, *, realm: str) -> DesktopSlot:
    """The account whose participant made ``request``: from the session cookie, else from HTTP Basic
    credentials (account id and password; wrong ones count as failed sign-ins). Raises 401 (with a
    Basic challenge for ``realm``) or 429. The caller still checks that it is the account wanted."""
    slot = session_account(request)
    if slot is not None:
        return slot
    credentials = basic_credentials(request)
    challenge = {"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'}
    if credentials is None:
        raise web.HTTPUnauthorized(text="Sign in with your account id and password.", headers=challenge)
    account, password = credentials
    signin_allowed(request, account)
    slot = verified_slot(request, account, password)
    if slot is None:
        known = find_slot(request.app[SLOTS], account) is not None
        log.info("%s refused: wrong credentials account=%s", realm, account if known else "(unknown)")
        raise web.HTTPUnauthorized(text="Wrong account or password.", headers=challenge)
    return slot


def free_accounts(request: web.Request) -> int:
    """Accounts of the token file that no sign-up has claimed yet."""
    taken = {c.account for c in claims(request.app[PARTICIPANTS].store)}
    return sum(1 for account in request.app[SLOTS] if account not in taken)
