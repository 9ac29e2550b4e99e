"""Participants' own pages: the sign-up form, sign-in, the personal page and archive downloads.

Routes (all relative to the gateway root, like every other page):

- ``GET|POST /signup``: terms documents with a checkbox each, name, e-mail, optional event code;
  hands out the next free account, signs the participant in and redirects (POST-redirect-GET) to
  ``GET /welcome``: the account, its password (to that session only) and the desktop link.
- ``GET|POST /login``, ``GET|POST /logout`` (a page that asks first): sign-in with account id and
  password (a session cookie); ``POST /api/session`` (JSON): the same from the viewer.
- ``GET /me``: the participant's desktop link and state, and their archive when it is offered;
  ``GET /me/password``: the session's own password (JSON), for "Show password" and the viewer.
- ``GET /archive/<account>``: the archive, for the session's account or HTTP Basic credentials
  (``curl -u ws01 -C - -O``); streamed from disk, with Range support and the SHA-256 in headers.

Every form carries a CSRF token tied to a random cookie (double submit, HMAC-signed with the
gateway's secret). Cookies are HttpOnly and SameSite=Strict, Secure when the gateway is served
over https. Sign-up requests and failed sign-ins are rate-limited per client address (behind the
gateway's Apache: the address Apache appended to X-Forwarded-For), and sign-ups also for all
addresses together. A password is shown once, to the sign-up that claimed the account; a field
holding a control character is refused. A public form needs the event code (checked by `up`). Passwords are compared with
``hmac.compare_digest`` and never logged or stored; they come from the token file.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from markdown_it import MarkdownIt

from gateway.model.signups import claim_account, claims
from gateway.model.archive import FORMATS, ArchiveRecord, archive_record, archives_dir
from gateway.model.config import Config, parse_moment
from gateway.model.errors import UserError
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.common.httpauth import basic_credentials, client_address
from gateway.web.app import CONFIG, SLOTS, _page, desktop_links, find_slot

__all__ = ["add_routes", "PARTICIPANTS", "TermsDocument", "load_documents", "render_markdown", "RateLimit"]

log = logging.getLogger("gateway.participant")

SESSION_COOKIE = "gw_session"
CSRF_COOKIE = "gw_csrf"
CSRF_LIFETIME_S = 4 * 3600
MAX_FORM_BYTES = 32 * 1024
MAX_NAME = 200
MAX_EMAIL = 254
MAX_PASSWORD = 256
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_EMAIL_RE = re.compile(r"[^@\s<>\"',;]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\.[A-Za-z]{2,63}")
#: Control characters (C0, DEL, C1), line/paragraph separators and bidirectional overrides: refused
#: in every field (they forge log lines, CSV rows and what an organiser reads in `accounts list`).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FIELD_LABELS = {"name": "your name", "email": "your e-mail address", "event_code": "the event code",
                 "account": "the account", "password": "the password"}
_ARCHIVE_TYPES = {"tar.gz": "application/gzip", "zip": "application/zip"}


# -- terms documents --------------------------------------------------------------------------------

_MARKDOWN = MarkdownIt("commonmark", {"html": False})  # raw HTML in a document is shown as text


def render_markdown(text: str) -> str:
    """Markdown as safe HTML: HTML in the source is escaped, unsafe link schemes are dropped."""
    return _MARKDOWN.render(text)


@dataclass(frozen=True, slots=True)
class TermsDocument:
    title: str
    html: str
    sha256: str


def load_documents(config: Config) -> tuple[TermsDocument, ...]:
    """Read registration.documents (relative paths: beside the config file). UserError if unreadable."""
    base = Path(config.source).parent if not config.source.startswith("<") else Path.cwd()
    documents = []
    for name in config.registration.documents:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"registration.documents: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        heading = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "")
        documents.append(TermsDocument(heading or path.stem, render_markdown(text),
                                       hashlib.sha256(text.encode()).hexdigest()))
    return tuple(documents)


# -- rate limits --------------------------------------------------------------------------------------


class RateLimit:
    """At most ``limit`` events per key within ``window_s`` (a sliding window, in memory)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: dict[str, collections.deque[float]] = {}

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        if len(self._events) > 10_000:  # forget idle keys so the table stays small
            self._events = {k: v for k, v in self._events.items() if v and v[-1] > now - self.window_s}
        events = self._events.setdefault(key, collections.deque())
        while events and events[0] <= now - self.window_s:
            events.popleft()
        return events

    def blocked(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        now = time.monotonic()
        events = self._recent(key, now)
        return events[0] + self.window_s - now if len(events) >= self.limit else 0.0

    def add(self, key: str) -> None:
        self._recent(key, time.monotonic()).append(time.monotonic())


# -- the routes' shared state ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Participants:
    config: Config
    store: StateStore
    state_dir: Path
    secret: bytes
    documents: tuple[TermsDocument, ...]
    signups: RateLimit
    #: Sign-up requests from all addresses together (many addresses must not exhaust the accounts).
    all_signups: RateLimit
    signin_failures: RateLimit

    @property
    def secure(self) -> bool:
        return self.config.tls.enabled or (self.config.public_url or "").startswith("https://")

    def sign(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "|".join(parts).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")


PARTICIPANTS = web.AppKey("participants", _Participants)


def add_routes(app: web.Application, *, config: Config, store: StateStore, state_dir: Path) -> None:
    """Add the participants' routes to the gateway's web app (see the module docstring)."""
    r = config.registration
    app[PARTICIPANTS] = _Participants(
        config=config, store=store, state_dir=state_dir, secret=_load_secret(state_dir),
        documents=load_documents(config) if r.enabled else (),
        signups=RateLimit(r.signup_attempts, r.signup_window_s),
        all_signups=RateLimit(r.signup_global_attempts, r.signup_global_window_s),
        signin_failures=RateLimit(r.signin_failures, r.signin_window_s),
    )
    app.router.add_get("/signup", signup_form)
    app.router.add_post("/signup", signup)
    app.router.add_get("/login", signin_form)
    app.router.add_post("/login", signin)
    app.router.add_get("/logout", signout_form)
    app.router.add_post("/logout", signout)
    app.router.add_get("/welcome", welcome)
    app.router.add_get("/me/password", my_password)
    app.router.add_post("/api/session", session_from_viewer)
    app.router.add_get("/me", me)
    app.router.add_get("/archive/{account}", download_archive)


def _load_secret(state_dir: Path) -> bytes:
    """The key that signs cookies and form tokens: random, 0600, kept across restarts."""
    path = ensure_private_dir(state_dir / "secrets") / "web-session.key"
    try:
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    secret = secrets.token_bytes(32)
    atomic_write(path, secret, mode=0o600)
    return secret


def _client_address(request: web.Request, config: Config) -> str:
    return client_address(request, behind_apache=config.apache.mode != "none")


def _set_cookie(response: web.StreamResponse, p: _Participants, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Strict", secure=p.secure)


# -- CSRF -------------------------------------------------------------------------------------------------


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


def _render(request: web.Request, template: str, *, status: int = 200, **context: object) -> web.Response:
    cookies: dict[str, str] = {}
    csrf = _csrf_token(request, cookies)
    response = _page(request, template, "./", csrf=csrf, **context)
    response.set_status(status)
    for name, value in cookies.items():
        _set_cookie(response, request.app[PARTICIPANTS], name, value, None)
    return response


async def _read_form(request: web.Request) -> Mapping[str, str]:
    if request.content_length is None or request.content_length > MAX_FORM_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_FORM_BYTES, actual_size=request.content_length or 0)
    data = await request.post()
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    if not _csrf_ok(request, form.get("csrf", "")):
        raise web.HTTPForbidden(text="This form has expired or did not come from this site. "
                                     "Reload the page and try again.")
    return form


# -- passwords and sessions ---------------------------------------------------------------------------


def _password_matches(slot: DesktopSlot | None, password: str) -> bool:
    expected = slot.account.password if slot is not None else secrets.token_hex(8)
    ok = hmac.compare_digest(password.encode(), expected.encode())
    return ok and slot is not None


def _session_cookie(p: _Participants, slot: DesktopSlot) -> str:
    expires = str(int(time.time() + p.config.registration.session_lifetime_s))
    # The password's hash is in the signature: a new token file ends old sessions.
    fingerprint = hashlib.sha256(slot.account.password.encode()).hexdigest()
    return f"{slot.account.id}:{expires}:{p.sign('session', slot.account.id, expires, fingerprint)}"


def _session_account(request: web.Request) -> DesktopSlot | None:
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


def session_account(request: web.Request) -> DesktopSlot | None:
    """The signed-in participant's account (None: not signed in, or sign-in is not offered)."""
    return _session_account(request) if PARTICIPANTS in request.app else None


def _too_many(seconds: float, what: str) -> web.HTTPTooManyRequests:
    wait = max(1, int(seconds + 0.999))
    return web.HTTPTooManyRequests(text=f"Too many {what} from your address; try again in {wait} s.",
                                   headers={"Retry-After": str(wait)})


def _busy(seconds: float) -> web.HTTPTooManyRequests:
    wait = max(1, int(seconds + 0.999))
    log.warning("sign-up refused: the global sign-up rate limit is reached")
    return web.HTTPTooManyRequests(text=f"Too many sign-ups at the moment; try again in {wait} s.",
                                   headers={"Retry-After": str(wait)})


def _fields_with_control_characters(form: Mapping[str, str]) -> list[str]:
    """The form's fields (by name) that hold a control character, before anything is stripped."""
    return [key for key, value in form.items() if _CONTROL_RE.search(key) or _CONTROL_RE.search(value)]


def _control_message(fields: list[str]) -> str:
    labels = [_FIELD_LABELS.get(f, "a field") for f in fields if not _CONTROL_RE.search(f)] or ["a field"]
    return ("Please remove the control characters (line breaks, tabs and the like) from "
            + ", ".join(dict.fromkeys(labels)) + ".")


# -- sign-up ------------------------------------------------------------------------------------------------

SIGNUP_COOKIE = "gw_signup"


def normalise_code(code: str) -> str:
    """Event codes are read aloud and typed on phones: case and surrounding spaces don't matter."""
    return " ".join(code.split()).casefold()


def free_accounts(request: web.Request) -> int:
    """Accounts of the token file that no sign-up has claimed yet."""
    taken = {c.account for c in claims(request.app[PARTICIPANTS].store)}
    return sum(1 for account in request.app[SLOTS] if account not in taken)


def _signup_page(request: web.Request, *, status: int = 200, errors: Mapping[str, str] | None = None,
                 values: Mapping[str, object] | None = None) -> web.Response:
    p = request.app[PARTICIPANTS]
    values = values or {}
    return _render(request, "signup.html.j2", status=status, documents=p.documents, errors=errors or {},
                   name=values.get("name", ""), email=values.get("email", ""),
                   event_code=values.get("event_code", ""), accepted=values.get("accepted", set()),
                   needs_code=p.config.registration.event_code is not None, free=free_accounts(request))


async def signup_form(request: web.Request) -> web.Response:
    if not request.app[CONFIG].registration.enabled:
        raise web.HTTPNotFound(text="Sign-up is not open.")
    return _signup_page(request)


def _signup_errors(p: _Participants, form: Mapping[str, str], name: str, email: str) -> dict[str, str]:
    """What is wrong with the form, by field (shown next to each field)."""
    r = p.config.registration
    errors: dict[str, str] = {}
    if not name or len(name) > MAX_NAME:
        errors["name"] = f"Please give your name (at most {MAX_NAME} characters)."
    if len(email) > MAX_EMAIL or not _EMAIL_RE.fullmatch(email):
        errors["email"] = "Please give a valid e-mail address, e.g. ada@example.org."
    if r.event_code is not None and not hmac.compare_digest(
            normalise_code(form.get("event_code", "")).encode(), normalise_code(r.event_code).encode()):
        errors["event_code"] = "The event code is not right; it was announced at the event."
    for i, d in enumerate(p.documents):
        if form.get(f"accept-{i}") != "yes":
            errors[f"accept-{i}"] = f"Please read and accept: {d.title}."
    return errors


async def signup(request: web.Request) -> web.Response:
    p = request.app[PARTICIPANTS]
    r = p.config.registration
    if not r.enabled:
        raise web.HTTPNotFound(text="Sign-up is not open.")
    address = _client_address(request, p.config)
    wait = p.signups.blocked(address)
    if wait:
        raise _too_many(wait, "sign-up requests")
    wait = p.all_signups.blocked("*")
    if wait:
        raise _busy(wait)
    p.signups.add(address)
    p.all_signups.add("*")
    form = await _read_form(request)
    unsafe = _fields_with_control_characters(form)
    if unsafe:
        return _signup_page(request, status=400, errors={"form": _control_message(unsafe)})
    name = form.get("name", "").strip()
    email = form.get("email", "").strip()
    # What was typed comes back with the errors: nobody should type it twice.
    values = {"name": name[:MAX_NAME], "email": email[:MAX_EMAIL], "event_code": form.get("event_code", "")[:200],
              "accepted": {i for i in range(len(p.documents)) if form.get(f"accept-{i}") == "yes"}}
    errors = _signup_errors(p, form, name, email)
    if errors:
        return _signup_page(request, status=400, errors=errors, values=values)

    accounts = list(request.app[SLOTS])
    outcome = claim_account(p.store, accounts, email=email, name=name, address=address,
                            documents=[(d.title, d.sha256) for d in p.documents])
    if outcome.claim is None:
        log.warning("sign-up refused: every account is taken")
        return _signup_page(request, status=409, values=values, errors={
            "form": "Sorry, every account has been given out. Please ask the organisers."})
    slot = request.app[SLOTS][outcome.claim.account]
    log.info("account %s account=%s", "claimed again" if outcome.existing else "claimed", slot.account.id)
    # POST-redirect-GET: the result page survives Back and reload. A new account signs its
    # participant in (the personal page and the viewer then need no password typed); the same
    # e-mail again (a neighbour who read it off a badge) only learns that it has an account.
    response = web.HTTPSeeOther("welcome")
    lifetime = int(r.session_lifetime_s)
    kind = "existing" if outcome.existing else "new"
    expires = str(int(time.time()) + lifetime)
    _set_cookie(response, p, SIGNUP_COOKIE,
                f"{slot.account.id}:{kind}:{expires}:{p.sign('signup', slot.account.id, kind, expires)}", lifetime)
    if not outcome.existing:
        _set_cookie(response, p, SESSION_COOKIE, _session_cookie(p, slot), lifetime)
    raise response


def _signup_result(request: web.Request) -> tuple[DesktopSlot, str] | None:
    """The account and kind ("new", "existing") of this browser's last sign-up, if its cookie is genuine."""
    p = request.app[PARTICIPANTS]
    account, kind, expires, mac = (request.cookies.get(SIGNUP_COOKIE, "").split(":") + ["", "", "", ""])[:4]
    slot = request.app[SLOTS].get(account)
    if slot is None or kind not in ("new", "existing") or not expires.isdigit() or int(expires) < time.time():
        return None
    if not hmac.compare_digest(mac.encode(), p.sign("signup", account, kind, expires).encode()):
        return None
    return slot, kind


async def welcome(request: web.Request) -> web.Response:
    """The sign-up's result: the password (to the session it signed in only), with a copy button."""
    found = _signup_result(request)
    if found is None:
        raise web.HTTPSeeOther("me" if _session_account(request) is not None else "signup")
    slot, kind = found
    session = _session_account(request)
    shown = kind == "new" and session is slot
    result = {"account": slot.account.id, "existing": kind == "existing", "shown": shown,
              "password": slot.account.password if shown else "", "view_url": f"view/{slot.account.id}"}
    return _render(request, "welcome.html.j2", result=result)


# -- sign-in, sign-out -------------------------------------------------------------------------------------


def _signin_page(request: web.Request, *, status: int = 200, errors: Mapping[str, str] | None = None,
                 account: str = "") -> web.Response:
    return _render(request, "signin.html.j2", status=status, errors=errors or {}, account=account,
                   signed_out=request.query.get("signed_out") == "1",
                   registration=request.app[CONFIG].registration.enabled)


async def signin_form(request: web.Request) -> web.Response:
    if _session_account(request) is not None:
        raise web.HTTPSeeOther("me")
    return _signin_page(request)


async def signin(request: web.Request) -> web.StreamResponse:
    p = request.app[PARTICIPANTS]
    address = _client_address(request, p.config)
    wait = p.signin_failures.blocked(address)
    if wait:
        raise _too_many(wait, "failed sign-ins")
    form = await _read_form(request)
    unsafe = _fields_with_control_characters(form)
    if unsafe:
        return _signin_page(request, status=400, errors={"form": _control_message(unsafe)})
    account = form.get("account", "").strip()[:64]
    slot = find_slot(request.app[SLOTS], account)
    if not _password_matches(slot, form.get("password", "")[:MAX_PASSWORD]) or slot is None:
        p.signin_failures.add(address)
        log.info("sign-in failed account=%s", slot.account.id if slot is not None else "(unknown)")
        return _signin_page(request, status=401, errors={"password": "Wrong account or password."},
                            account=account if _ACCOUNT_RE.fullmatch(account) else "")
    response = web.HTTPSeeOther("me")
    _set_cookie(response, p, SESSION_COOKIE, _session_cookie(p, slot), int(p.config.registration.session_lifetime_s))
    log.info("signed in account=%s", slot.account.id)
    raise response


async def session_from_viewer(request: web.Request) -> web.Response:
    """The viewer signs its participant in with the password typed there (files need a session).

    JSON only: a cross-site form cannot send it without a CORS preflight, so it is the CSRF guard."""
    p = request.app[PARTICIPANTS]
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    address = _client_address(request, p.config)
    wait = p.signin_failures.blocked(address)
    if wait:
        raise _too_many(wait, "failed sign-ins")
    try:
        body = await request.json()
        account, password = str(body["account"]), str(body["password"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "send account and password"}, status=400)
    slot = find_slot(request.app[SLOTS], account[:64])
    if not _password_matches(slot, password[:MAX_PASSWORD]) or slot is None:
        p.signin_failures.add(address)
        return web.json_response({"error": "wrong account or password"}, status=401)
    response = web.json_response({"account": slot.account.id})
    _set_cookie(response, p, SESSION_COOKIE, _session_cookie(p, slot), int(p.config.registration.session_lifetime_s))
    return response


async def signout_form(request: web.Request) -> web.Response:
    """Sign-out asks first: a participant who taps it by mistake keeps their session."""
    slot = _session_account(request)
    if slot is None:
        raise web.HTTPSeeOther("login")
    return _render(request, "signout.html.j2", account=slot.account.id)


async def signout(request: web.Request) -> web.StreamResponse:
    await _read_form(request)
    response = web.HTTPSeeOther("login?signed_out=1")
    p = request.app[PARTICIPANTS]
    response.del_cookie(SESSION_COOKIE, path="/", secure=p.secure, httponly=True, samesite="Strict")
    response.del_cookie(SIGNUP_COOKIE, path="/", secure=p.secure, httponly=True, samesite="Strict")
    raise response


async def my_password(request: web.Request) -> web.Response:
    """The signed-in participant's own password (the personal page's "Show", the viewer's auto-connect).

    Only to the session's own account; never in a URL; a cross-site page cannot read it (no CORS)."""
    slot = _session_account(request)
    if slot is None:
        return web.json_response({"error": "not signed in"}, status=401, headers={"Cache-Control": "no-store"})
    return web.json_response({"account": slot.account.id, "password": slot.account.password},
                             headers={"Cache-Control": "no-store"})


# -- the personal page ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Window:
    open: bool
    status: int
    message: str


def _window(config: Config) -> _Window:
    a = config.archive
    now = time.time()
    if a.available_from is not None and now < parse_moment(a.available_from).timestamp():
        return _Window(False, 403, f"Archives can be downloaded from {a.available_from}.")
    if a.expires is not None and now >= parse_moment(a.expires).timestamp():
        return _Window(False, 410, f"Archives could be downloaded until {a.expires}; they are no longer offered.")
    return _Window(True, 200, f"Available until {a.expires}." if a.expires else "")


def _archive_file(p: _Participants, account: str) -> tuple[ArchiveRecord, Path] | None:
    record = archive_record(p.store, account)
    if record is None or record.format not in FORMATS or record.filename != f"{account}{FORMATS[record.format]}":
        return None
    path = archives_dir(p.state_dir) / record.filename
    if path.is_symlink() or not path.is_file():
        return None
    return record, path


async def me(request: web.Request) -> web.Response:
    slot = _session_account(request)
    if slot is None:
        raise web.HTTPSeeOther("login")
    p = request.app[PARTICIPANTS]
    archive = None
    if p.config.archive.enabled:
        found = _archive_file(p, slot.account.id)
        window = _window(p.config)
        archive = {"ready": found is not None, "open": window.open, "message": window.message}
        if found is not None:
            record, _ = found
            archive.update(url=f"archive/{slot.account.id}", filename=record.filename, sha256=record.sha256,
                           size=_human_size(record.size), skipped=record.skipped,
                           created=time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)))
    return _render(request, "me.html.j2", account=slot.account.id, state=slot.phase.value,
                   reason=slot.reason, view_url=f"view/{slot.account.id}", archive=archive, **desktop_links(slot))


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} bytes"


# -- downloads ------------------------------------------------------------------------------------------


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    return basic_credentials(request)


async def download_archive(request: web.Request) -> web.StreamResponse:
    p = request.app[PARTICIPANTS]
    wanted = request.match_info["account"]
    if not _ACCOUNT_RE.fullmatch(wanted):
        raise web.HTTPNotFound(text="No such archive.")
    slot = authenticated_slot(request, realm="archive")
    if slot.account.id != wanted:
        log.warning("archive download refused: account=%s asked for another account's archive", slot.account.id)
        raise web.HTTPForbidden(text="This is not your archive.")
    if not p.config.archive.enabled:
        raise web.HTTPNotFound(text="Archives are not offered for download.")
    window = _window(p.config)
    if not window.open:
        raise (web.HTTPGone if window.status == 410 else web.HTTPForbidden)(text=window.message)
    found = _archive_file(p, wanted)
    if found is None:
        raise web.HTTPNotFound(text="Your archive is not ready yet.")
    record, path = found
    digest = base64.b64encode(bytes.fromhex(record.sha256)).decode()
    headers = {
        "Content-Type": _ARCHIVE_TYPES[record.format],
        "Content-Disposition": f'attachment; filename="{record.filename}"',
        "Repr-Digest": f"sha-256=:{digest}:",
        "Digest": f"SHA-256={digest}",
        "X-Archive-SHA256": record.sha256,
        "Cache-Control": "private, no-store",
    }
    if not request.headers.get("Range"):
        log.info("archive download account=%s", wanted)
    return _ArchiveResponse(path, chunk_size=256 * 1024, headers=headers)


class _ArchiveResponse(web.FileResponse):
    """aiohttp's FileResponse with Range handled as resuming clients need it.

    aiohttp reads If-Range only as a date: an entity tag there was ignored, so a download resumed
    after the archive was packed again got the new archive's tail after the old one's head (a
    corrupt file). It also refuses several ranges (``bytes=0-99,200-299``) with 416, though they
    are satisfiable. Both now get the whole file (200), which RFC 9110 allows for any Range.
    """

    def __init__(self, path: Path, **kwargs: object) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self._archive = path

    async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def]
        if request.headers.get("Range") and not _range_applies(request, self._archive):
            headers = request.headers.copy()
            for name in ("Range", "If-Range"):
                headers.popall(name, None)
            request = request.clone(headers=headers)
        return await super().prepare(request)


def _range_applies(request: web.BaseRequest, path: Path) -> bool:
    """False when the Range header must be ignored: several ranges, a malformed one, or an If-Range
    entity tag that is not the file's current (strong) one. An If-Range date aiohttp checks itself."""
    try:
        request.http_range
    except ValueError:
        return False
    validator = request.headers.get("If-Range", "").strip()
    if validator.startswith(('"', "W/")):
        st = path.stat()
        return validator == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'  # FileResponse's ETag; weak never matches
    return True


# -- for other authenticated routes (the DCV proxy) ----------------------------------------------------


def authenticated_slot(request: web.Request, *, realm: str) -> DesktopSlot:
    """The account whose participant made ``request``: from the session cookie, else from HTTP Basic
    credentials (account id and password; wrong ones count as failed sign-ins). Raises 401 (with a
    Basic challenge for ``realm``) or 429. The caller still checks that it is the account wanted."""
    slot = _session_account(request)
    if slot is not None:
        return slot
    credentials = _basic_credentials(request)
    challenge = {"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'}
    if credentials is None:
        raise web.HTTPUnauthorized(text="Sign in with your account id and password.", headers=challenge)
    p = request.app[PARTICIPANTS]
    address = _client_address(request, p.config)
    wait = p.signin_failures.blocked(address)
    if wait:
        raise _too_many(wait, "failed sign-ins")
    account, password = credentials
    slot = find_slot(request.app[SLOTS], account)
    if not _password_matches(slot, password[:MAX_PASSWORD]) or slot is None:
        p.signin_failures.add(address)
        log.info("%s refused: wrong credentials account=%s", realm, account if slot is not None else "(unknown)")
        raise web.HTTPUnauthorized(text="Wrong account or password.", headers=challenge)
    return slot
