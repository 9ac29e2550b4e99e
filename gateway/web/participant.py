"""Participants' own pages: sign-in, sign-out, the personal page and archive downloads.

Routes (all relative to the gateway root, like every other page):

- ``GET|POST /login``, ``GET|POST /logout`` (a page that asks first): sign-in with account id and
  password (a session cookie); ``POST /api/session`` (JSON): the same from the viewer.
- ``GET /me``: the participant's desktop link and state, and their archive when it is offered;
  ``GET /me/password``: the session's own password (JSON), for "Show password" and the viewer.
- ``GET /archive/<account>``: the archive, for the session's account or HTTP Basic credentials
  (``curl -u ws01 -C - -O``); streamed from disk, with Range support and the SHA-256 in headers.

Sign-up is :mod:`gateway.web.signup`; sessions, cookies, CSRF and the sign-in rate limit are
:mod:`gateway.web.sessions`.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.model.archive import FORMATS, ArchiveRecord, archive_record, archives_dir
from gateway.model.config import Config, parse_moment
from gateway.model.status import DesktopSlot
from gateway.model.tokens import ACCOUNT_ID_RE
from gateway.web.context import CONFIG, SLOTS, counted, desktop_links, find_slot
from gateway.web.sessions import (
    PARTICIPANTS, SESSION_COOKIE, SIGNUP_COOKIE, Participants, authenticated_slot, control_message,
    fields_with_control_characters, read_form, render_form_page, session_account, session_cookie, set_cookie,
    signin_allowed, verified_slot,
)

__all__ = ["add_participant_routes", "archive_window", "ArchiveWindow"]

#: Each handler's route is written above it (none of them overlap, so their order does not matter).
_routes = web.RouteTableDef()

log = logging.getLogger("gateway.participant")

_ARCHIVE_TYPES = {"tar.gz": "application/gzip", "zip": "application/zip"}


def add_participant_routes(app: web.Application) -> None:
    """Sign-in, sign-out, the personal page and archives (the app needs :data:`PARTICIPANTS`)."""
    app.router.add_routes(_routes)


# -- sign-in, sign-out -------------------------------------------------------------------------------------


def _signin_page(request: web.Request, *, status: int = 200, errors: dict[str, str] | None = None,
                 account: str = "") -> web.Response:
    return render_form_page(request, "signin.html.j2", status=status, errors=errors or {}, account=account,
                            signed_out=request.query.get("signed_out") == "1",
                            registration=request.app[CONFIG].registration.enabled)


def _start_session(response: web.StreamResponse, p: Participants, slot: DesktopSlot) -> None:
    set_cookie(response, p, SESSION_COOKIE, session_cookie(p, slot), int(p.config.registration.session_lifetime_s))


@_routes.get("/login")
async def signin_form(request: web.Request) -> web.Response:
    if session_account(request) is not None:
        raise web.HTTPSeeOther("me")
    return _signin_page(request)


@_routes.post("/login")
async def signin(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    unsafe = fields_with_control_characters(form)
    if unsafe:
        return _signin_page(request, status=400, errors={"form": control_message(unsafe)})
    account = form.get("account", "").strip()[:64]
    signin_allowed(request, account)
    slot = verified_slot(request, account, form.get("password", ""))
    if slot is None:
        known = find_slot(request.app[SLOTS], account)
        log.info("sign-in failed account=%s", known.account.id if known is not None else "(unknown)")
        return _signin_page(request, status=401, errors={"password": "Wrong account or password."},
                            account=account if ACCOUNT_ID_RE.fullmatch(account) else "")
    response = web.HTTPSeeOther("me")
    _start_session(response, request.app[PARTICIPANTS], slot)
    log.info("signed in account=%s", slot.account.id)
    raise response


@_routes.post("/api/session")
async def session_from_viewer(request: web.Request) -> web.Response:
    """The viewer signs its participant in with the password typed there (files need a session).

    JSON only: a cross-site form cannot send it without a CORS preflight, so it is the CSRF guard."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    try:
        body = await request.json()
        account, password = str(body["account"]), str(body["password"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "send account and password"}, status=400)
    signin_allowed(request, account)
    slot = verified_slot(request, account[:64], password)
    if slot is None:
        return web.json_response({"error": "wrong account or password"}, status=401)
    response = web.json_response({"account": slot.account.id})
    _start_session(response, request.app[PARTICIPANTS], slot)
    return response


@_routes.get("/logout")
async def signout_form(request: web.Request) -> web.Response:
    """Sign-out asks first: a participant who taps it by mistake keeps their session."""
    slot = session_account(request)
    if slot is None:
        raise web.HTTPSeeOther("login")
    return render_form_page(request, "signout.html.j2", account=slot.account.id)


@_routes.post("/logout")
async def signout(request: web.Request) -> web.StreamResponse:
    await read_form(request)
    response = web.HTTPSeeOther("login?signed_out=1")
    p = request.app[PARTICIPANTS]
    response.del_cookie(SESSION_COOKIE, path="/", secure=p.secure, httponly=True, samesite="Strict")
    response.del_cookie(SIGNUP_COOKIE, path="/", secure=p.secure, httponly=True, samesite="Strict")
    raise response


@_routes.get("/me/password")
async def my_password(request: web.Request) -> web.Response:
    """The signed-in participant's own password (the personal page's "Show", the viewer's auto-connect).

    Only to the session's own account; never in a URL; a cross-site page cannot read it (no CORS)."""
    slot = session_account(request)
    if slot is None:
        return web.json_response({"error": "not signed in"}, status=401, headers={"Cache-Control": "no-store"})
    return web.json_response({"account": slot.account.id, "password": slot.account.password},
                             headers={"Cache-Control": "no-store"})


# -- the personal page ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchiveWindow:
    """Whether archives may be downloaded now; if not, the HTTP status (403 not yet, 410 no longer) and why."""

    open: bool
    status: int
    message: str


def archive_window(config: Config) -> ArchiveWindow:
    """The archive download window (``archive.available_from`` to ``archive.expires``) as seen now."""
    a = config.archive
    now = time.time()
    if a.available_from is not None and now < parse_moment(a.available_from).timestamp():
        return ArchiveWindow(False, 403, f"Archives can be downloaded from {a.available_from}.")
    if a.expires is not None and now >= parse_moment(a.expires).timestamp():
        return ArchiveWindow(False, 410, f"Archives could be downloaded until {a.expires}; they are no longer offered.")
    return ArchiveWindow(True, 200, f"Available until {a.expires}." if a.expires else "")


def _archive_file(p: Participants, account: str) -> tuple[ArchiveRecord, Path] | None:
    record = archive_record(p.store, account)
    if record is None or record.format not in FORMATS or record.filename != f"{account}{FORMATS[record.format]}":
        return None
    path = archives_dir(p.state_dir) / record.filename
    if path.is_symlink() or not path.is_file():
        return None
    return record, path


@_routes.get("/me")
async def me(request: web.Request) -> web.Response:
    slot = session_account(request)
    if slot is None:
        raise web.HTTPSeeOther("login")
    p = request.app[PARTICIPANTS]
    archive = None
    if p.config.archive.enabled:
        found = _archive_file(p, slot.account.id)
        window = archive_window(p.config)
        archive = {"ready": found is not None, "open": window.open, "message": window.message}
        if found is not None:
            record, _ = found
            archive.update(url=f"archive/{slot.account.id}", filename=record.filename, sha256=record.sha256,
                           size=_human_size(record.size), skipped=record.skipped,
                           created=time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)))
    return render_form_page(request, "me.html.j2", account=slot.account.id, state=slot.phase.value,
                            reason=slot.reason, view_url=f"view/{slot.account.id}", archive=archive, **desktop_links(slot))


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return counted(size, "byte") if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return counted(size, "byte")


# -- downloads ------------------------------------------------------------------------------------------


@_routes.get("/archive/{account}")
async def download_archive(request: web.Request) -> web.StreamResponse:
    p = request.app[PARTICIPANTS]
    wanted = request.match_info["account"]
    if not ACCOUNT_ID_RE.fullmatch(wanted):
        raise web.HTTPNotFound(text="No such archive.")
    slot = authenticated_slot(request, realm="archive")
    if slot.account.id != wanted:
        log.warning("archive download refused: account=%s asked for another account's archive", slot.account.id)
        raise web.HTTPForbidden(text="This is not your archive.")
    if not p.config.archive.enabled:
        raise web.HTTPNotFound(text="Archives are not offered for download.")
    window = archive_window(p.config)
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
