"""Instructors watch desktops without touching them: the admin page's "watch" and expiring share links.

* ``/admin/watch/{account}`` (admin credential): the viewer page in view-only mode, connecting by
  itself with the account's view-only password (never the full one);
* ``POST /admin/api/desktops/{account}/share`` (admin credential, JSON body ``{"minutes": 60}``):
  makes a link ``watch/<token>`` that opens the same view-only viewer without credentials until it
  expires. Only the SHA-256 of the random token is stored, with the account and the expiry; an
  unknown token gets 404, an expired one 410.

* ``POST /admin/api/desktops/{account}/share/revoke`` (admin credential): ends every link of the
  account now.

Every watch, link and use of a link is written to the audit log.

A share link hands the account's view-only password to the browser (noVNC authenticates itself). So
that it is not a lasting credential, the view-only password is replaced as soon as a link expires or
is revoked (:func:`retire_view_only_password`): the account's desktop gets a new password file, which
Xvnc reads at each authentication, and the old password stops working (at once on local and SSH desktops;
a Slurm job makes the file from the rewritten secret within seconds). Viewers still on a valid link
(and the admin's own watch page) get the new one when their page is loaded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.model.actions import Action
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.model.viewonly import rotate_view_only_password, view_only_made_at, view_only_password
from gateway.web.admin_access import check_admin
from gateway.web.context import client_address_of, render_page

__all__ = ["WatchLinks", "WatchLink", "Watching", "WATCHING", "add_watch_routes", "DEFAULT_LINK_MINUTES", "MAX_LINK_MINUTES",
           "retire_view_only_password"]

ActFunction = Callable[[str, str], Awaitable[str]]

log = logging.getLogger("gateway.watch")

DEFAULT_LINK_MINUTES = 60.0
MAX_LINK_MINUTES = 24 * 60.0
#: Links that expired longer ago than this are deleted (until then they answer 410, not 404).
_KEEP_EXPIRED_S = 7 * 24 * 3600.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class WatchLink:
    account: str
    created_by: str
    created_at: float
    expires_at: float


class WatchLinks:
    """The share links in the state database (table ``watch_links``, migration 3)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def create(self, account: str, created_by: str, minutes: float, *, now: float | None = None) -> tuple[str, WatchLink]:
        """A new random token for ``account``, valid ``minutes``; only its hash is stored."""
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(24)
        link = WatchLink(account, created_by, now, now + minutes * 60.0)
        with self.store.transaction() as db:
            db.execute("DELETE FROM watch_links WHERE expires_at < ?", (now - _KEEP_EXPIRED_S,))
            db.execute("INSERT INTO watch_links(token_sha256, account, created_by, created_at, expires_at) "
                       "VALUES (?, ?, ?, ?, ?)", (_digest(token), account, created_by, now, link.expires_at))
        return token, link

    def find(self, token: str) -> WatchLink | None:
        """The link of ``token`` (expired or not), or None for a token never handed out."""
        if not token or len(token) > 128:
            return None
        rows = self.store.query("SELECT account, created_by, created_at, expires_at FROM watch_links "
                                "WHERE token_sha256 = ?", (_digest(token),))
        return WatchLink(*rows[0]) if rows else None

    def revoke(self, account: str, *, now: float | None = None) -> int:
        """End every link of ``account`` that is still valid; returns how many."""
        now = time.time() if now is None else now
        with self.store.transaction() as db:
            cursor = db.execute("UPDATE watch_links SET expires_at = ? WHERE account = ? AND expires_at > ?",
                                (now, account, now))
            return cursor.rowcount

    def lapsed(self, state_dir: Path, *, now: float | None = None) -> list[str]:
        """Accounts with a link that ended after their view-only password was made: it must change."""
        now = time.time() if now is None else now
        rows = self.store.query("SELECT account, MAX(expires_at) FROM watch_links WHERE expires_at <= ? "
                                "GROUP BY account", (now,))
        return [account for account, ended in rows if ended >= view_only_made_at(state_dir, account)]


async def retire_view_only_password(state_dir: Path, account: str, act: ActFunction, store: StateStore,
                                    why: str) -> None:
    """Replace the account's view-only password and have its running desktop use the new one."""
    rotate_view_only_password(state_dir, account)
    try:
        await act(account, Action.REFRESH_PASSWORDS.value)
    except LookupError:  # no desktop of that account runs; its next start uses the new password
        pass
    store.record_event("view-only:rotated", account, why)
    log.info("view-only password replaced account=%s why=%s", account, why)


@dataclass(frozen=True, slots=True)
class Watching:
    """What the watch routes need from the running gateway (one per app, under :data:`WATCHING`)."""

    slots: Mapping[str, DesktopSlot]
    store: StateStore
    state_dir: Path
    #: Asks a desktop's watcher to act (here: use the new view-only password); None in small test setups.
    act: ActFunction | None = None

    @property
    def links(self) -> WatchLinks:
        return WatchLinks(self.store)

    def slot_of(self, account: str) -> DesktopSlot:
        slot = self.slots.get(account)
        if slot is None:
            raise web.HTTPNotFound(text="No such account.")
        return slot


WATCHING = web.AppKey("watching", Watching)


def add_watch_routes(app: web.Application) -> None:
    """The watch page, share-link creation (both behind the admin credential) and /watch/<token>.

    The app needs :data:`WATCHING` and the admin credential."""
    app.router.add_get("/admin/watch/{account}", admin_watch)
    app.router.add_post("/admin/api/desktops/{account}/share", admin_share)
    app.router.add_post("/admin/api/desktops/{account}/share/revoke", admin_revoke)
    app.router.add_get("/watch/{token}", shared_watch)


def _watch_page(request: web.Request, slot: DesktopSlot, root: str) -> web.Response:
    if slot.protocol != "vnc":
        raise web.HTTPConflict(text=f"Watching works for VNC desktops; {slot.account.id} uses {slot.protocol}.")
    response = render_page(
        request, "viewer.html.j2", root, account=slot.account.id,
        websocket_path=slot.account.websocket_path.lstrip("/"), novnc_url=f"{root}novnc/",
        view_only=True, watch_password=view_only_password(request.app[WATCHING].state_dir, slot.account.id),
        # The viewer page's keyboard-layout picker is hidden in view-only mode.
        keyboard_layout=getattr(slot, "keyboard_layout", ""), keyboard_layouts=[],
    )
    response.headers["Cache-Control"] = "no-store"
    return response


async def admin_watch(request: web.Request) -> web.Response:
    user = check_admin(request)
    w = request.app[WATCHING]
    slot = w.slot_of(request.match_info["account"])
    response = _watch_page(request, slot, "../../")
    w.store.record_event("admin:watch", slot.account.id, f"by {user}@{client_address_of(request)}: view-only")
    return response


def _admin_action(request: web.Request) -> tuple[str, Watching, DesktopSlot]:
    """Who asks (the admin, from where), and about which desktop; 401, 415 or 404 instead."""
    user = check_admin(request)
    if request.content_type != "application/json":  # the CSRF guard, as for the other actions
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    w = request.app[WATCHING]
    return f"{user}@{client_address_of(request)}", w, w.slot_of(request.match_info["account"])


async def admin_share(request: web.Request) -> web.Response:
    actor, w, slot = _admin_action(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body must be JSON") from None
    minutes = body.get("minutes", DEFAULT_LINK_MINUTES) if isinstance(body, dict) else None
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes <= MAX_LINK_MINUTES:
        raise web.HTTPBadRequest(text=f"minutes must be a number above 0 and at most {MAX_LINK_MINUTES:g}")
    if slot.protocol != "vnc":
        raise web.HTTPConflict(text=f"Watching works for VNC desktops; {slot.account.id} uses {slot.protocol}.")
    token, link = w.links.create(slot.account.id, actor, float(minutes))
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(link.expires_at))
    w.store.record_event("admin:share", slot.account.id,
                         f"by {actor}: view-only link {_digest(token)[:12]} until {expires}")
    log.info("view-only link made account=%s minutes=%g", slot.account.id, minutes)
    return web.json_response({"account": slot.account.id, "path": f"watch/{token}",
                              "expires_at": link.expires_at}, headers={"Cache-Control": "no-store"})


async def admin_revoke(request: web.Request) -> web.Response:
    actor, w, slot = _admin_action(request)
    ended = w.links.revoke(slot.account.id)
    w.store.record_event("admin:share-revoke", slot.account.id, f"by {actor}: {ended} link(s) ended")
    if w.act is not None:
        await retire_view_only_password(w.state_dir, slot.account.id, w.act, w.store, f"links revoked by {actor}")
    return web.json_response({"account": slot.account.id, "revoked": ended},
                             headers={"Cache-Control": "no-store"})


async def shared_watch(request: web.Request) -> web.Response:
    w = request.app[WATCHING]
    token = request.match_info["token"]
    link = w.links.find(token)
    # A real page, not a bare error: whoever opens a stale link should know what to do.
    if link is None or time.time() >= link.expires_at:
        expired = link is not None
        response = render_page(request, "message.html.j2", "../",
                               heading="This link has expired" if expired else "This link does not work",
                               message=("This view-only link has expired; ask the organiser for a new one."
                                        if expired else "No such link. Check that you copied all of it, "
                                        "or ask the organiser for a new one."))
        response.set_status(410 if expired else 404)
        return response
    slot = w.slot_of(link.account)
    response = _watch_page(request, slot, "../")
    w.store.record_event("watch-link:open", link.account, f"link {_digest(token)[:12]} from {client_address_of(request)}")
    return response
