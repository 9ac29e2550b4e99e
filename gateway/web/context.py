"""What every route module of the web app shares: the app's keys, the one page renderer, and small lookups.

Route modules import this module (and :mod:`gateway.web.sessions`, :mod:`gateway.web.admin_access`),
never each other; only the factory in :mod:`gateway.web.app` imports the route modules.
"""

from __future__ import annotations

from collections.abc import Mapping

import jinja2
from aiohttp import web

from gateway.common.httpauth import client_address
from gateway.model.config import PROJECT_ROOT, Config
from gateway.model.status import DesktopSlot
from gateway.model.theme import text_colours

__all__ = ["CONFIG", "SLOTS", "TEMPLATES", "TEMPLATES_DIR", "render_page", "find_slot", "desktop_links",
           "client_address_of", "make_templates", "noun", "counted"]

TEMPLATES_DIR = PROJECT_ROOT / "web" / "templates"

SLOTS = web.AppKey("slots", Mapping[str, DesktopSlot])
CONFIG = web.AppKey("config", Config)
TEMPLATES = web.AppKey("templates", jinja2.Environment)


def make_templates() -> jinja2.Environment:
    """The pages' templates: undefined names are errors, and every value is escaped. Filters ``noun`` and
    ``counted`` put a count's noun in the singular or plural (``{{ n|counted("item") }}``: "1 item", "2 items")."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                                     autoescape=True)
    environment.filters.update(noun=noun, counted=counted)
    return environment


def noun(n: int, singular: str, plural: str | None = None) -> str:
    """The noun for ``n`` things: ``singular`` for 1, else ``plural`` (by default singular + "s").
    web/static/plural.js says it the same way in the pages' scripts."""
    return singular if n == 1 else plural or f"{singular}s"


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` with its noun: "1 item", "2 items"."""
    return f"{n} {noun(n, singular, plural)}"


def render_page(request: web.Request, template: str, root: str, **context: object) -> web.Response:
    """A page of the gateway in the event's theme; ``root`` is the relative URL of the gateway's root."""
    config = request.app[CONFIG]
    event = config.event
    theme = {k: v for k, v in (("logo_url", event.logo_url), ("primary_color", event.primary_color),
                               ("accent_color", event.accent_color)) if v}
    theme.update(text_colours(event.primary_color))  # the config check warned about what is still below AA
    text = request.app[TEMPLATES].get_template(template).render(
        title=event.title, root=root, theme=theme, **context
    )
    response = web.Response(text=text, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    return response


def find_slot(slots: Mapping[str, DesktopSlot], name: str) -> DesktopSlot | None:
    """The account called ``name``, ignoring case and surrounding spaces ("WS01 " is ws01): account
    names are unique ignoring case (tokens.py), and phones capitalise the first letter."""
    name = name.strip()
    slot = slots.get(name)
    if slot is None:
        wanted = name.casefold()
        slot = next((s for key, s in slots.items() if key.casefold() == wanted), None)
    return slot


def desktop_links(slot: DesktopSlot) -> dict[str, object]:
    """What the pages offer for a desktop besides the VNC viewer: a DCV session's browser link and
    connection file (both only served after sign-in), or why a DCV account got VNC instead."""
    if slot.protocol == "dcv":
        return {"protocol": "dcv", "dcv_url": f"dcv/{slot.account.id}/", "dcv_file_url": f"dcv/{slot.account.id}.dcv",
                "note": None}
    return {"protocol": slot.protocol, "dcv_url": None, "dcv_file_url": None, "note": slot.detail.get("note")}


def client_address_of(request: web.Request) -> str:
    """The client's address for rate limits and the audit log: X-Forwarded-For counts only behind the
    gateway's Apache (private or system), never without one (nor in an app without a config)."""
    config = request.app.get(CONFIG)
    return client_address(request, behind_apache=config is not None and config.apache.mode != "none")
