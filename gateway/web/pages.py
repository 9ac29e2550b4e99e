"""The participants' pages: landing page, viewer page and a small JSON status API.

Handlers only read the desktops' live records; they never drive a backend (a keyboard layout is a
request to the desktop's watcher). Every URL in the pages is relative, so the gateway works behind
any path prefix and over https.
"""

from __future__ import annotations

import hmac
import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.backends.base import BackendError
from gateway.common.ratelimit import RateLimit
from gateway.model.config_checks import KEYBOARD_LAYOUT_RE
from gateway.model.status import DesktopSlot
from gateway.web.context import CONFIG, SLOTS, desktop_links, find_slot, render_page
from gateway.web.sessions import PARTICIPANTS, free_accounts, session_account

__all__ = ["add_page_routes", "KEYBOARD", "KeyboardSwitch", "SetKeyboardLayout", "KEYBOARD_LAYOUTS", "viewer_context", "welcome_html"]

SetKeyboardLayout = Callable[[str, str], Awaitable[None]]

#: Layouts offered in the viewer (XKB names); organisers' own default is added if missing.
KEYBOARD_LAYOUTS = (
    ("us", "English (US)"), ("gb", "English (UK)"), ("de", "German"), ("ch", "Swiss"), ("at", "Austrian"),
    ("fr", "French"), ("be", "Belgian"), ("es", "Spanish"), ("it", "Italian"), ("pt", "Portuguese"),
    ("br", "Portuguese (Brazil)"), ("nl", "Dutch"), ("se", "Swedish"), ("no", "Norwegian"), ("dk", "Danish"),
    ("fi", "Finnish"), ("pl", "Polish"), ("cz", "Czech"), ("hu", "Hungarian"), ("tr", "Turkish"),
    ("gr", "Greek"), ("ru", "Russian"), ("ua", "Ukrainian"), ("jp", "Japanese"), ("kr", "Korean"),
)
KEYBOARD_MAX_FAILURES = 5  # wrong passwords per account and minute


@dataclass(slots=True)
class KeyboardSwitch:
    """How the viewer's keyboard-layout picker reaches the desktop's watcher, and its password limit."""

    set_layout: SetKeyboardLayout
    #: Wrong passwords per account.
    failures: RateLimit = field(default_factory=lambda: RateLimit(KEYBOARD_MAX_FAILURES, 60.0))


KEYBOARD = web.AppKey("keyboard", KeyboardSwitch)


def add_page_routes(app: web.Application, *, keyboard: bool) -> None:
    """Landing, viewer, the status API and health; ``keyboard``: the layout switch (needs :data:`KEYBOARD`)."""
    app.router.add_get("/", landing)
    app.router.add_get("/view/{account}", viewer)
    app.router.add_get("/api/desktops", api_desktops)
    if keyboard:
        app.router.add_post("/api/desktops/{account}/keyboard", api_keyboard_layout)
    app.router.add_get("/healthz", healthz)


def welcome_html(text: str) -> str:
    """The organiser's welcome text as HTML paragraphs (escaped: it is text, not markup)."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)


def _participant_session(request: web.Request) -> tuple[DesktopSlot | None, int | None]:
    """The signed-in account and the number of accounts still free for sign-up (None: no sign-up)."""
    if not request.app[CONFIG].registration.enabled and not request.cookies:
        return None, None
    if PARTICIPANTS not in request.app:
        return None, None
    free = free_accounts(request) if request.app[CONFIG].registration.enabled else None
    return session_account(request), free


async def landing(request: web.Request) -> web.Response:
    slots = request.app[SLOTS]
    desktops = [dict(slot.public(), view_url=f"view/{slot.account.id}", **desktop_links(slot))
                for slot in slots.values()]
    signed_in, free = _participant_session(request)
    return render_page(request, "landing.html.j2", "./", desktops=desktops,
                       welcome_html=welcome_html(request.app[CONFIG].event.welcome),
                       registration=request.app[CONFIG].registration.enabled, free=free,
                       signed_in=signed_in.account.id if signed_in else None)


def viewer_context(request: web.Request, slot: DesktopSlot) -> dict[str, object]:
    """What every viewer page needs (the participant's and the instructors' watch pages)."""
    config = request.app[CONFIG]
    layouts = list(KEYBOARD_LAYOUTS)
    if slot.keyboard_layout not in dict(layouts):
        layouts.insert(0, (slot.keyboard_layout, slot.keyboard_layout))
    return {"account": slot.account.id, "websocket_path": slot.account.websocket_path.lstrip("/"),
            "novnc_url": "../novnc/", "keyboard_layout": slot.keyboard_layout, "keyboard_layouts": layouts,
            "defaults": {"quality": config.viewer.quality, "compression": config.viewer.compression},
            "desktop_state": slot.phase.value, "desktop_reason": slot.reason or "",
            # Why a viewer is refused: the relay says so (builtin); Apache's 429 the page cannot see.
            "proxy_mode": config.proxy.mode, "max_viewers": config.proxy.max_viewers_per_account}


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
    return render_page(request, "viewer.html.j2", "../", signed_in=signed_in.account.id if signed_in else None,
                       auto_connect=mine, files=files, files_possible=_transfer_offered(request, slot),
                       **viewer_context(request, slot))


def _transfer_offered(request: web.Request, slot: DesktopSlot) -> bool:
    """Files in and out (offered with the participants' sign-in): local desktops only (their home is here)."""
    offered = PARTICIPANTS in request.app and request.app[CONFIG].transfer.enabled
    return offered and slot.backend == "local" and slot.protocol == "vnc"


async def api_keyboard_layout(request: web.Request) -> web.Response:
    """A participant switches their desktop's keyboard layout; the account's password proves who."""
    slot = request.app[SLOTS].get(request.match_info["account"])
    if slot is None:
        raise web.HTTPNotFound(text="No such account.")
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    switch = request.app[KEYBOARD]
    if switch.failures.blocked(slot.account.id):
        return web.json_response({"error": "too many wrong passwords; wait a minute"}, status=429)
    try:
        body = await request.json()
        password, layout = str(body["password"]), str(body["layout"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "send password and layout"}, status=400)
    if not hmac.compare_digest(password.encode(), slot.account.password.encode()):
        switch.failures.add(slot.account.id)
        return web.json_response({"error": "wrong password"}, status=403)
    if not KEYBOARD_LAYOUT_RE.fullmatch(layout):
        return web.json_response({"error": "not a keyboard layout name"}, status=400)
    try:
        await switch.set_layout(slot.account.id, layout)
    except BackendError as exc:
        return web.json_response({"error": str(exc)}, status=409)
    return web.json_response({"account": slot.account.id, "layout": layout})


async def api_desktops(request: web.Request) -> web.Response:
    desktops = [slot.public() for slot in request.app[SLOTS].values()]
    return web.json_response({"desktops": desktops}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
