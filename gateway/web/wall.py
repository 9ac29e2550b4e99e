"""The wall of live thumbnails (/admin/wall) and its pictures, behind the admin credential.

Handlers only read the :class:`~gateway.web.thumbnails.ThumbnailService`'s cache; each request marks
the wall as watched, so the service grabs only while someone looks.
"""

from __future__ import annotations

import time

from aiohttp import web

from gateway.web.admin_access import check_admin
from gateway.web.context import render_page
from gateway.web.thumbnails import ThumbnailService

__all__ = ["WALL", "add_wall_routes"]

WALL = web.AppKey("wall", ThumbnailService)


def add_wall_routes(app: web.Application) -> None:
    """The wall page and one PNG per desktop (the app needs :data:`WALL` and the admin credential)."""
    app.router.add_get("/admin/wall", wall)
    app.router.add_get("/admin/api/thumbnail/{account}.png", thumbnail)


async def wall(request: web.Request) -> web.Response:
    check_admin(request)
    service = request.app[WALL]
    service.watched()
    width, height = service.size
    return render_page(request, "admin-wall.html.j2", "../", interval_s=service.config.interval_s,
                       thumbnail_width=width, thumbnail_height=height)


async def thumbnail(request: web.Request) -> web.Response:
    check_admin(request)
    service = request.app[WALL]
    account = request.match_info["account"]
    if account not in service.slots:
        raise web.HTTPNotFound(text="No such account.")
    picture = await service.thumbnail(account)
    if picture is None:
        raise web.HTTPNotFound(text="No picture of this desktop yet.", headers={"Cache-Control": "no-store"})
    return web.Response(body=picture.png, content_type="image/png",
                        headers={"Cache-Control": "no-store",
                                 "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                                time.gmtime(picture.taken_at))})
