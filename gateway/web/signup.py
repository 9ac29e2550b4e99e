"""Sign-up: the participant takes the next free account (``GET|POST /signup``, then ``GET /welcome``).

``/signup`` shows the terms documents with a checkbox each, name, e-mail and, for a public form,
the event code (checked by `up`). A valid form claims the next free account, signs the participant
in and redirects (POST-redirect-GET) to ``/welcome``: the account, its password (to that session
only, shown once, to the sign-up that claimed the account) and the desktop link. The same e-mail
again learns only that it has an account. Sign-up requests are rate-limited per client address and
for all addresses together; a field holding a control character is refused.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Mapping

from aiohttp import web

from gateway.model.signups import claim_account
from gateway.model.status import DesktopSlot
from gateway.web.context import CONFIG, SLOTS, client_address_of
from gateway.web.sessions import (
    PARTICIPANTS, SESSION_COOKIE, SIGNUP_COOKIE, Participants, control_message, fields_with_control_characters,
    free_accounts, read_form, render_form_page, session_account, session_cookie, set_cookie, too_many,
)

__all__ = ["add_signup_routes", "normalise_code", "MAX_NAME", "MAX_EMAIL"]

log = logging.getLogger("gateway.participant")

MAX_NAME = 200
MAX_EMAIL = 254
_EMAIL_RE = re.compile(r"[^@\s<>\"',;]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\.[A-Za-z]{2,63}")


def add_signup_routes(app: web.Application) -> None:
    """The sign-up form and its result page (the app needs :data:`gateway.web.sessions.PARTICIPANTS`)."""
    app.router.add_get("/signup", signup_form)
    app.router.add_post("/signup", signup)
    app.router.add_get("/welcome", welcome)


def normalise_code(code: str) -> str:
    """Event codes are read aloud and typed on phones: case and surrounding spaces don't matter."""
    return " ".join(code.split()).casefold()


def _signup_page(request: web.Request, *, status: int = 200, errors: Mapping[str, str] | None = None,
                 values: Mapping[str, object] | None = None) -> web.Response:
    p = request.app[PARTICIPANTS]
    values = values or {}
    return render_form_page(request, "signup.html.j2", status=status, documents=p.documents, errors=errors or {},
                            name=values.get("name", ""), email=values.get("email", ""),
                            event_code=values.get("event_code", ""), accepted=values.get("accepted", set()),
                            needs_code=p.config.registration.event_code is not None, free=free_accounts(request))


async def signup_form(request: web.Request) -> web.Response:
    if not request.app[CONFIG].registration.enabled:
        raise web.HTTPNotFound(text="Sign-up is not open.")
    return _signup_page(request)


def _signup_errors(p: Participants, form: Mapping[str, str], name: str, email: str) -> dict[str, str]:
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


def _busy(seconds: float) -> web.HTTPTooManyRequests:
    wait = max(1, int(seconds + 0.999))
    log.warning("sign-up refused: the global sign-up rate limit is reached")
    return web.HTTPTooManyRequests(text=f"Too many sign-ups at the moment; try again in {wait} s.",
                                   headers={"Retry-After": str(wait)})


def _count_signup_request(request: web.Request, p: Participants) -> None:
    """Raises 429 when this address failed too often, or all addresses together asked too often; else
    counts the request among all of them. This address's own count grows only with its failures
    (:func:`_refused`): a room behind one NAT signs up from one address, and must not be refused for it."""
    wait = p.signups.blocked(client_address_of(request))
    if wait:
        raise too_many(wait, "failed sign-ups")
    wait = p.all_signups.blocked("*")
    if wait:
        raise _busy(wait)
    p.all_signups.add("*")


def _refused(request: web.Request, p: Participants, errors: Mapping[str, str],
             values: Mapping[str, object] | None = None) -> web.Response:
    """The form again, with what was wrong; counted against the client's address."""
    p.signups.add(client_address_of(request))
    return _signup_page(request, status=400, errors=errors, values=values)


async def signup(request: web.Request) -> web.Response:
    p = request.app[PARTICIPANTS]
    r = p.config.registration
    if not r.enabled:
        raise web.HTTPNotFound(text="Sign-up is not open.")
    _count_signup_request(request, p)
    form = await read_form(request)
    unsafe = fields_with_control_characters(form)
    if unsafe:
        return _refused(request, p, {"form": control_message(unsafe)})
    name = form.get("name", "").strip()
    email = form.get("email", "").strip()
    # What was typed comes back with the errors: nobody should type it twice.
    values = {"name": name[:MAX_NAME], "email": email[:MAX_EMAIL], "event_code": form.get("event_code", "")[:200],
              "accepted": {i for i in range(len(p.documents)) if form.get(f"accept-{i}") == "yes"}}
    errors = _signup_errors(p, form, name, email)
    if errors:
        return _refused(request, p, errors, values)

    accounts = list(request.app[SLOTS])
    outcome = claim_account(p.store, accounts, email=email, name=name, address=client_address_of(request),
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
    set_cookie(response, p, SIGNUP_COOKIE,
               f"{slot.account.id}:{kind}:{expires}:{p.sign('signup', slot.account.id, kind, expires)}", lifetime)
    if not outcome.existing:
        set_cookie(response, p, SESSION_COOKIE, session_cookie(p, slot), lifetime)
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
    session = session_account(request)
    if found is None:
        raise web.HTTPSeeOther("me" if session is not None else "signup")
    slot, kind = found
    shown = kind == "new" and session is slot
    result = {"account": slot.account.id, "existing": kind == "existing", "shown": shown,
              "password": slot.account.password if shown else "", "view_url": f"view/{slot.account.id}"}
    return render_form_page(request, "welcome.html.j2", result=result)
