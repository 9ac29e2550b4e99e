"""The web app's factory: the one place that composes every route of the gateway's pages and APIs.

Only this module imports the route modules (pages, signup, participant, dcv_proxy, transfer, watch,
wall, cockpit); they share :mod:`gateway.web.context`, :mod:`gateway.web.sessions` and
:mod:`gateway.web.admin_access`, never each other. The factory puts each part's state under its
app key, then adds the routes. :func:`reserved_segments` reads the same composition, with every
part enabled, so that no token's websocket path can take a route of the app.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.common.frontdoor import FRONT_TOKEN
from gateway.common.httpauth import FRONT_TOKEN_KEY
from gateway.model.config import STATIC_DIR, Config
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.web.admin_access import ADMIN_ACCESS, AdminAccess
from gateway.web.cockpit import COCKPIT, Cockpit, add_admin_routes
from gateway.web.context import CONFIG, SLOTS, TEMPLATES, make_templates
from gateway.web.dcv_proxy import add_dcv_routes
from gateway.web.pages import KEYBOARD, KeyboardSwitch, SetKeyboardLayout, add_page_routes
from gateway.web.participant import add_participant_routes
from gateway.web.sessions import PARTICIPANTS, make_participants
from gateway.web.signup import add_signup_routes
from gateway.web.terms import load_documents
from gateway.web.transfer import TRANSFER, Transfers, add_transfer_routes
from gateway.web.wall import WALL, add_wall_routes
from gateway.web.watch import WATCHING, Watching, add_watch_routes

__all__ = ["make_app", "reserved_segments", "SLOTS", "CONFIG", "TEMPLATES"]

log = logging.getLogger("gateway.webapp")

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    # The viewer loads noVNC modules and opens a websocket to its own origin only.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: https:; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self' ws: wss:; frame-ancestors 'none'"
    ),
}


@dataclass(frozen=True, slots=True)
class RouteSet:
    """Which parts of the app serve routes (the landing and viewer pages always do)."""

    keyboard: bool = True
    participants: bool = True  # sign-up, sign-in, the personal page, archives, DCV sessions
    transfer: bool = True
    admin: bool = True  # the cockpit's admin page and /metrics
    watch: bool = True
    wall: bool = True


def make_app(config: Config, slots: Mapping[str, DesktopSlot], *, novnc: Path,
             store: StateStore | None = None, state_dir: Path | None = None,
             cockpit: Cockpit | None = None,
             set_keyboard_layout: SetKeyboardLayout | None = None) -> web.Application:
    app = web.Application(middlewares=[_security_headers])
    app[SLOTS] = slots
    app[CONFIG] = config
    if config.apache.mode != "none":  # only the X-Forwarded-For of the gateway's Apache is believed
        app[FRONT_TOKEN_KEY] = FRONT_TOKEN
    app[TEMPLATES] = make_templates()
    if set_keyboard_layout is not None:
        app[KEYBOARD] = KeyboardSwitch(set_keyboard_layout)
    if store is not None and state_dir is not None:  # sign-up, sign-in, personal page, archives
        documents = load_documents(config) if config.registration.enabled else ()
        app[PARTICIPANTS] = make_participants(config, store, state_dir, documents)
        if config.transfer.enabled:  # files in and out of local desktops, behind the same sign-in
            app[TRANSFER] = Transfers(config, state_dir)
    if cockpit is not None:  # the organisers' admin page and /metrics
        app[COCKPIT] = cockpit
        cockpit.metrics.attach(cockpit.slots)
        app[ADMIN_ACCESS] = AdminAccess(cockpit.admin_user, cockpit.admin_password)
        if cockpit.state_dir is not None:  # instructors' view-only tools
            app[WATCHING] = Watching(cockpit.slots, cockpit.store, cockpit.state_dir, cockpit.act)
        if cockpit.thumbnails is not None:
            app[WALL] = cockpit.thumbnails
    routes = RouteSet(keyboard=KEYBOARD in app, participants=PARTICIPANTS in app, transfer=TRANSFER in app,
                      admin=COCKPIT in app, watch=WATCHING in app, wall=WALL in app)
    _add_routes(app, routes, novnc=novnc)
    return app


def _add_routes(app: web.Application, routes: RouteSet, *, novnc: Path) -> None:
    """Every route of the app, in the order they are matched."""
    add_page_routes(app, keyboard=routes.keyboard)
    if routes.participants:
        add_signup_routes(app)
        add_participant_routes(app)
        add_dcv_routes(app)  # DCV sessions (/dcv/ACCOUNT/): only behind the participants' sign-in
        if routes.transfer:
            add_transfer_routes(app)
    if routes.admin:
        # Before the admin's routes: its generic action route would take their POSTs too.
        if routes.watch:
            add_watch_routes(app)
        if routes.wall:
            add_wall_routes(app)
        add_admin_routes(app)
    # Apache serves these itself; the routes are here for running without it (tests, system mode).
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    app.router.add_static("/novnc/", novnc, follow_symlinks=False)


def reserved_segments() -> frozenset[str]:
    """The first path segments of every route the app can serve, whatever the config enables."""
    app = web.Application()
    _add_routes(app, RouteSet(), novnc=STATIC_DIR)  # the handlers are never called: no state needed
    firsts = (resource.canonical.strip("/").split("/")[0] for resource in app.router.resources())
    return frozenset(first for first in firsts if first)


@web.middleware
async def _security_headers(request: web.Request, handler):  # type: ignore[no-untyped-def]
    response = await handler(request)
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
