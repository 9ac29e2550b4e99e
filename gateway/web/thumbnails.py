"""The wall's thumbnails (:mod:`gateway.web.wall`): a small PNG of every desktop, fresh while someone looks.

One task in the supervisor's task group grabs every ready VNC desktop's screen over RFB (a shared
connection with the view-only password, so the participant is never disturbed or disconnected),
scales it down with Pillow and keeps the PNG in memory. It grabs only while the wall is open:
each request for the wall or a thumbnail marks the wall as watched, and grabbing stops once nobody
has asked for :data:`WATCHED_FOR_INTERVALS` intervals.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.common import rfb
from gateway.model.config import WallConfig
from gateway.model.status import DesktopSlot, Phase
from gateway.model.viewonly import view_only_password

__all__ = ["Thumbnail", "ThumbnailService", "render_thumbnail", "parse_size"]

log = logging.getLogger("gateway.thumbnails")

GRAB_TIMEOUT_S = 5.0
#: The wall counts as open while a request came within this many grab intervals.
WATCHED_FOR_INTERVALS = 3
#: A thumbnail request waits this long for a first picture of its desktop.
FIRST_PICTURE_WAIT_S = 8.0


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


@dataclass(frozen=True, slots=True)
class Thumbnail:
    png: bytes
    taken_at: float  # time.time()


def render_thumbnail(frame: rfb.Framebuffer, size: tuple[int, int]) -> bytes:
    """The screen scaled to fit ``size`` (aspect kept, padded with black) as PNG bytes."""
    from PIL import Image, ImageOps

    image = Image.frombuffer("RGBX", (frame.width, frame.height), frame.pixels, "raw", "RGBX", 0, 1).convert("RGB")
    small = ImageOps.pad(image, size, method=Image.Resampling.BILINEAR, color=(0, 0, 0))
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=False)
    return out.getvalue()


class ThumbnailService:
    """Grabs while the wall is watched; handlers only read :attr:`cache` and call :meth:`watched`."""

    def __init__(self, config: WallConfig, slots: Mapping[str, DesktopSlot], state_dir: Path) -> None:
        self.config = config
        self.size = parse_size(config.thumbnail_size)
        self.slots = slots
        self.state_dir = state_dir
        self.cache: dict[str, Thumbnail] = {}
        self.updated = asyncio.Event()
        self._wanted = asyncio.Event()
        self._last_request = float("-inf")  # time.monotonic()
        self.grabs = 0  # how many screens were grabbed, for tests and logs

    def watched(self) -> None:
        """Someone looks at the wall: keep grabbing (or start again)."""
        self._last_request = time.monotonic()
        self._wanted.set()

    @property
    def active(self) -> bool:
        return time.monotonic() - self._last_request < WATCHED_FOR_INTERVALS * self.config.interval_s

    async def run(self) -> None:
        """Forever: sleep until the wall is watched, then grab every few seconds while it is."""
        limit = asyncio.Semaphore(self.config.concurrency)
        while True:
            if not self.active:
                self.cache.clear()  # nobody looks: don't keep pictures of people's screens around
                self._wanted.clear()
                await self._wanted.wait()
                log.info("wall opened: grabbing thumbnails every %g s", self.config.interval_s)
            started = time.monotonic()
            ready = [s for s in self.slots.values() if s.phase is Phase.READY and s.endpoint and s.protocol == "vnc"]
            await asyncio.gather(*(self._grab(slot, limit) for slot in ready))
            for account in set(self.cache) - {s.account.id for s in ready}:
                del self.cache[account]
            self.updated.set()
            self.updated = asyncio.Event()
            await asyncio.sleep(max(0.0, self.config.interval_s - (time.monotonic() - started)))

    async def _grab(self, slot: DesktopSlot, limit: asyncio.Semaphore) -> None:
        assert slot.endpoint is not None
        account = slot.account.id
        async with limit:
            try:
                password = await asyncio.to_thread(view_only_password, self.state_dir, account)
                frame = await rfb.grab_tcp(slot.endpoint_ip or slot.endpoint.host, slot.endpoint.port, password,
                                           timeout_s=GRAB_TIMEOUT_S)
                png = await asyncio.to_thread(render_thumbnail, frame, self.size)
            except (OSError, TimeoutError, rfb.RfbError) as exc:
                log.warning("thumbnail not grabbed account=%s error=%s", account, str(exc) or type(exc).__name__)
                return
        self.grabs += 1
        self.cache[account] = Thumbnail(png, time.time())

    async def thumbnail(self, account: str) -> Thumbnail | None:
        """The latest picture of ``account``; waits briefly for a first one when the wall just opened."""
        self.watched()
        deadline = time.monotonic() + FIRST_PICTURE_WAIT_S
        while account not in self.cache and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.updated.wait()
            except TimeoutError:
                break
        return self.cache.get(account)
