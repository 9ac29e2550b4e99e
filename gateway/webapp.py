"""The participants' pages: landing page, viewer page and a small JSON status API (aiohttp).

Handlers only read the desktops' live records; they never drive a backend. Every URL in the pages
is relative, so the gateway works behind any path prefix and over https.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
from aiohttp import web

from .apache import STATIC_DIR
from .config import PROJECT_ROOT, Config
from .state import StateStore
from .status import DesktopSlot

if TYPE_CHECKING:
    from .cockpit import Cockpit

__all__ = ["make_app", "SLOTS", "CONFIG"]

TEMPLATES_DIR = PROJECT_ROOT / "web" / "templates"

SLOTS = web.AppKey("slots", Mapping[str, DesktopSlot])
CONFIG = web.AppKey("config", Config)
TEMPLATES = web.AppKey("templates", jinja2.Environment)

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


def make_app(config: Config, slots: Mapping[str, DesktopSlot], *, novnc: Path,
             store: StateStore | None = None, state_dir: Path | None = None,
             cockpit: "Cockpit | None" = None) -> web.Application:
    app = web.Application(middlewares=[_security_headers])
    app[SLOTS] = slots
    app[CONFIG] = config
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
    )
    app.router.add_get("/", landing)
    app.router.add_get("/view/{account}", viewer)
    app.router.add_get("/api/desktops", api_desktops)
    app.router.add_get("/healthz", healthz)
    if store is not None and state_dir is not None:  # sign-up, sign-in, personal page, archives
        from . import participant

        participant.add_routes(app, config=config, store=store, state_dir=state_dir)
    if cockpit is not None:  # the organisers' admin page and /metrics
        from .cockpit import add_admin_routes

        add_admin_routes(app, cockpit, render_page=_page)
    # Apache serves these itself; the routes are here for running without it (tests, system mode).
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    app.router.add_static("/novnc/", novnc, follow_symlinks=False)
    return app


@web.middleware
async def _security_headers(request: web.Request, handler):  # type: ignore[no-untyped-def]
    response = await handler(request)
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _page(request: web.Request, template: str, root: str, **context: object) -> web.Response:
    config = request.app[CONFIG]
    event = config.event
    theme = {k: v for k, v in (("logo_url", event.logo_url), ("primary_color", event.primary_color),
                               ("accent_color", event.accent_color)) if v}
    text = request.app[TEMPLATES].get_template(template).render(
        title=event.title, root=root, theme=theme, **context
    )
    response = web.Response(text=text, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    return response


def welcome_html(text: str) -> str:
    """The organiser's welcome text as HTML paragraphs (escaped: it is text, not markup)."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)


async def landing(request: web.Request) -> web.Response:
    slots = request.app[SLOTS]
    desktops = [dict(slot.public(), view_url=f"view/{slot.account.id}") for slot in slots.values()]
    return _page(request, "landing.html.j2", "./", desktops=desktops,
                 welcome_html=welcome_html(request.app[CONFIG].event.welcome))


async def viewer(request: web.Request) -> web.Response:
    slot = request.app[SLOTS].get(request.match_info["account"])
    if slot is None:
        raise web.HTTPNotFound(text="No such account.")
    return _page(request, "viewer.html.j2", "../", account=slot.account.id,
                 websocket_path=slot.account.websocket_path.lstrip("/"), novnc_url="../novnc/")


async def api_desktops(request: web.Request) -> web.Response:
    desktops = [slot.public() for slot in request.app[SLOTS].values()]
    return web.json_response({"desktops": desktops}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
