"""The participants' pages: landing page, viewer page and a small JSON status API (aiohttp).

Handlers only read the desktops' live records; they never drive a backend. Every URL in the pages
is relative, so the gateway works behind any path prefix and over https.
"""

from __future__ import annotations

import hmac
import html
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
from aiohttp import web

from gateway.model.config import PROJECT_ROOT, STATIC_DIR, Config
from gateway.common.frontdoor import FRONT_TOKEN
from gateway.common.httpauth import FRONT_TOKEN_KEY
from gateway.model.state import StateStore
from gateway.backends.base import BackendError
from gateway.model.status import DesktopSlot

if TYPE_CHECKING:
    from gateway.web.cockpit import Cockpit

__all__ = ["make_app", "SLOTS", "CONFIG"]

TEMPLATES_DIR = PROJECT_ROOT / "web" / "templates"
log = logging.getLogger("gateway.webapp")

SLOTS = web.AppKey("slots", Mapping[str, DesktopSlot])
CONFIG = web.AppKey("config", Config)
TEMPLATES = web.AppKey("templates", jinja2.Environment)

SetKeyboardLayout = Callable[[str, str], Awaitable[None]]
KEYBOARD = web.AppKey("keyboard", SetKeyboardLayout)
KEYBOARD_FAILURES = web.AppKey("keyboard_failures", dict)

#: Layouts offered in the viewer (XKB names); organisers' own default is added if missing.
KEYBOARD_LAYOUTS = (
    ("us", "English (US)"), ("gb", "English (UK)"), ("de", "German"), ("ch", "Swiss"), ("at", "Austrian"),
    ("fr", "French"), ("be", "Belgian"), ("es", "Spanish"), ("it", "Italian"), ("pt", "Portuguese"),
    ("br", "Portuguese (Brazil)"), ("nl", "Dutch"), ("se", "Swedish"), ("no", "Norwegian"), ("dk", "Danish"),
    ("fi", "Finnish"), ("pl", "Polish"), ("cz", "Czech"), ("hu", "Hungarian"), ("tr", "Turkish"),
    ("gr", "Greek"), ("ru", "Russian"), ("ua", "Ukrainian"), ("jp", "Japanese"), ("kr", "Korean"),
)
_LAYOUT_RE = re.compile(r"[a-z]{2,8}(?:\([A-Za-z0-9_-]+\))?")
KEYBOARD_MAX_FAILURES = 5  # wrong passwords per account and minute

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
             cockpit: "Cockpit | None" = None,
             set_keyboard_layout: SetKeyboardLayout | None = None) -> web.Application:
    app = web.Application(middlewares=[_security_headers])
    for warning in theme_colours(config.event.primary_color)[1]:
        log.warning("%s", warning)
    app[SLOTS] = slots
    app[CONFIG] = config
    if config.apache.mode == "private":  # only that Apache's X-Forwarded-For is believed
        app[FRONT_TOKEN_KEY] = FRONT_TOKEN
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
    )
    app.router.add_get("/", landing)
    app.router.add_get("/view/{account}", viewer)
    app.router.add_get("/api/desktops", api_desktops)
    if set_keyboard_layout is not None:
        app[KEYBOARD] = set_keyboard_layout
        app[KEYBOARD_FAILURES] = {}
        app.router.add_post("/api/desktops/{account}/keyboard", api_keyboard_layout)
    app.router.add_get("/healthz", healthz)
    if store is not None and state_dir is not None:  # sign-up, sign-in, personal page, archives
        from gateway.web import participant

        participant.add_routes(app, config=config, store=store, state_dir=state_dir)
        # DCV sessions (/dcv/ACCOUNT/): only behind the participants' sign-in.
        from gateway.web import dcv_proxy

        dcv_proxy.add_routes(app, config)
        if config.transfer.enabled:  # files in and out of local desktops, behind the same sign-in
            from gateway.web import transfer

            transfer.add_routes(app, config=config, state_dir=state_dir)
    if cockpit is not None:  # the organisers' admin page and /metrics
        from gateway.web.cockpit import add_admin_routes

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


# -- theme colours: WCAG AA contrast -------------------------------------------------------------------

_HEX_RE = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
AA_CONTRAST = 4.5  # WCAG 2 AA for normal text


def _rgb(colour: str) -> tuple[float, float, float] | None:
    match = _HEX_RE.fullmatch(colour.strip())
    if match is None:
        return None
    digits = match[1] if len(match[1]) == 6 else "".join(c * 2 for c in match[1])
    return tuple(int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


def _luminance(rgb: tuple[float, float, float]) -> float:
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """WCAG contrast ratio of two sRGB colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def theme_colours(primary: str | None) -> tuple[dict[str, str], list[str]]:
    """Text colours that stay readable on the event's primary colour (AA), and warnings for the log.

    White text sits on the primary colour (header, buttons) and the primary colour is the text of links
    on white: a light primary gets dark text on it, and links a darkened shade of it."""
    white, ink = (1.0, 1.0, 1.0), (0.078, 0.094, 0.122)  # --text: #14181f
    rgb = _rgb(primary) if primary else None
    if rgb is None:
        return {}, []
    colours, warnings = {}, []
    if contrast(rgb, white) < AA_CONTRAST:
        on = "#ffffff" if contrast(rgb, white) >= contrast(rgb, ink) else "#14181f"
        colours["on_primary"] = on
        darker = rgb
        while contrast(darker, white) < AA_CONTRAST:
            darker = tuple(c * 0.9 for c in darker)  # type: ignore[assignment]
        colours["primary_text"] = _hex(darker)
        warnings.append(f"event.primary_color {primary}: white text on it has a contrast of "
                        f"{contrast(rgb, white):.1f}:1, below WCAG AA ({AA_CONTRAST}:1); pages use {on} text on it "
                        f"and {colours['primary_text']} for links instead")
    return colours, warnings


def _page(request: web.Request, template: str, root: str, **context: object) -> web.Response:
    config = request.app[CONFIG]
    event = config.event
    theme = {k: v for k, v in (("logo_url", event.logo_url), ("primary_color", event.primary_color),
                               ("accent_color", event.accent_color)) if v}
    theme.update(theme_colours(event.primary_color)[0])
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


def find_slot(slots: Mapping[str, DesktopSlot], name: str) -> DesktopSlot | None:
    """The account called ``name``, ignoring case and surrounding spaces ("WS01 " is ws01): account
    names are unique ignoring case (tokens.py), and phones capitalise the first letter."""
    name = name.strip()
    slot = slots.get(name)
    if slot is None:
        wanted = name.casefold()
        slot = next((s for key, s in slots.items() if key.casefold() == wanted), None)
    return slot


def _participant_session(request: web.Request) -> tuple[DesktopSlot | None, int | None]:
    """The signed-in account and the number of accounts still free for sign-up (None: no sign-up)."""
    if not request.app[CONFIG].registration.enabled and not request.cookies:
        return None, None
    from gateway.web.participant import PARTICIPANTS, free_accounts, session_account

    if PARTICIPANTS not in request.app:
        return None, None
    free = free_accounts(request) if request.app[CONFIG].registration.enabled else None
    return session_account(request), free


async def landing(request: web.Request) -> web.Response:
    slots = request.app[SLOTS]
    desktops = [dict(slot.public(), view_url=f"view/{slot.account.id}", **desktop_links(slot))
                for slot in slots.values()]
    signed_in, free = _participant_session(request)
    return _page(request, "landing.html.j2", "./", desktops=desktops,
                 welcome_html=welcome_html(request.app[CONFIG].event.welcome),
                 registration=request.app[CONFIG].registration.enabled, free=free,
                 signed_in=signed_in.account.id if signed_in else None)


def desktop_links(slot: DesktopSlot) -> dict[str, object]:
    """What the pages offer for a desktop besides the VNC viewer: a DCV session's browser link and
    connection file (both only served after sign-in), or why a DCV account got VNC instead."""
    if slot.protocol == "dcv":
        return {"protocol": "dcv", "dcv_url": f"dcv/{slot.account.id}/", "dcv_file_url": f"dcv/{slot.account.id}.dcv",
                "note": None}
    return {"protocol": slot.protocol, "dcv_url": None, "dcv_file_url": None, "note": slot.detail.get("note")}


def viewer_context(request: web.Request, slot: DesktopSlot) -> dict[str, object]:
    """What every viewer page needs (the participant's and the instructors' watch pages)."""
    config = request.app[CONFIG]
    layouts = list(KEYBOARD_LAYOUTS)
    if slot.keyboard_layout not in dict(layouts):
        layouts.insert(0, (slot.keyboard_layout, slot.keyboard_layout))
    return {"account": slot.account.id, "websocket_path": slot.account.websocket_path.lstrip("/"),
            "novnc_url": "../novnc/", "keyboard_layout": slot.keyboard_layout, "keyboard_layouts": layouts,
            "defaults": {"quality": config.viewer.quality, "compression": config.viewer.compression},
            "desktop_state": slot.phase.value, "desktop_reason": slot.reason or ""}


async def viewer(request: web.Request) -> web.Response:
    name = request.match_info["account"]
    slot = find_slot(request.app[SLOTS], name)
    if slot is None:
        raise web.HTTPNotFound(text="No such account.")
    if slot.account.id != name:  # /view/WS01: the one address of ws01's viewer
        raise web.HTTPFound(slot.account.id)
    signed_in, _ = _participant_session(request)
    mine = signed_in is slot
    files = mine and _transfer_offered(request, slot)
    return _page(request, "viewer.html.j2", "../", signed_in=signed_in.account.id if signed_in else None,
                 auto_connect=mine, files=files, files_possible=_transfer_offered(request, slot),
                 **viewer_context(request, slot))


def _transfer_offered(request: web.Request, slot: DesktopSlot) -> bool:
    """Files in and out: local desktops only (their home is on this machine)."""
    from gateway.web.transfer import TRANSFER

    return TRANSFER in request.app and slot.backend == "local" and slot.protocol == "vnc"


async def api_keyboard_layout(request: web.Request) -> web.Response:
    """A participant switches their desktop's keyboard layout; the account's password proves who."""
    slot = request.app[SLOTS].get(request.match_info["account"])
    if slot is None:
        raise web.HTTPNotFound(text="No such account.")
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    failures = request.app[KEYBOARD_FAILURES].setdefault(slot.account.id, [])
    now = time.monotonic()
    failures[:] = [t for t in failures if now - t < 60]
    if len(failures) >= KEYBOARD_MAX_FAILURES:
        return web.json_response({"error": "too many wrong passwords; wait a minute"}, status=429)
    try:
        body = await request.json()
        password, layout = str(body["password"]), str(body["layout"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "send password and layout"}, status=400)
    if not hmac.compare_digest(password.encode(), slot.account.password.encode()):
        failures.append(now)
        return web.json_response({"error": "wrong password"}, status=403)
    if not _LAYOUT_RE.fullmatch(layout):
        return web.json_response({"error": "not a keyboard layout name"}, status=400)
    try:
        await request.app[KEYBOARD](slot.account.id, layout)
    except BackendError as exc:
        return web.json_response({"error": str(exc)}, status=409)
    return web.json_response({"account": slot.account.id, "layout": layout})


async def api_desktops(request: web.Request) -> web.Response:
    desktops = [slot.public() for slot in request.app[SLOTS].values()]
    return web.json_response({"desktops": desktops}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
