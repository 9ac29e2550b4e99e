"""The event's theme colours and their WCAG 2 AA contrast: the one implementation.

The pages (web/static/gateway.css) put text on the primary colour (header, buttons), use the primary
colour as the text of links on the page's light backgrounds, and mark boxes with a border in the accent
colour. :func:`text_colours` says which text colours keep that readable; :func:`contrast_warnings`
says what is still below AA, with the ratio. The config check (:mod:`gateway.model.config_checks`)
reports those warnings when the config is read; the web layer asks :func:`text_colours` for each page.

Colours are ``#rgb``, ``#rrggbb`` or a CSS colour name (the 148 of CSS Color 4, any case): names are
mapped to their values so that they are checked like the rest.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

__all__ = ["AA_TEXT", "AA_NON_TEXT", "INK", "PAGE_BACKGROUNDS", "rgb", "contrast", "text_colours",
           "contrast_warnings"]

RGB = tuple[float, float, float]

AA_TEXT = 4.5      # WCAG 2 AA, normal text (SC 1.4.3)
AA_NON_TEXT = 3.0  # WCAG 2 AA, borders and other marks (SC 1.4.11)
#: --text of gateway.css: the dark text used on a light primary colour.
INK = "#14181f"
#: The light backgrounds links and accent borders sit on (gateway.css --surface, --bg, the secondary
#: button's hover): each must keep the contrast.
PAGE_BACKGROUNDS = ("#ffffff", "#f3f5f9", "#f0f4ff")

_HEX_RE = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
_NAME_RE = re.compile(r"[A-Za-z]{3,20}")
_WHITE: RGB = (1.0, 1.0, 1.0)


def rgb(colour: str) -> RGB | None:
    """``#rgb``, ``#rrggbb`` or a CSS colour name as sRGB components from 0 to 1; None for anything else."""
    colour = colour.strip()
    if _NAME_RE.fullmatch(colour):
        colour = _css_names().get(colour.lower(), "")
    match = _HEX_RE.fullmatch(colour)
    if match is None:
        return None
    digits = match[1] if len(match[1]) == 6 else "".join(c * 2 for c in match[1])
    return tuple(int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


@functools.cache
def _css_names() -> dict[str, str]:
    """CSS Color 4's named colours (Pillow's table is exactly those 148), read only when a name is used."""
    from PIL import ImageColor

    return dict(ImageColor.colormap)  # type: ignore[arg-type]


def _luminance(colour: RGB) -> float:
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in colour]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: RGB, b: RGB) -> float:
    """WCAG contrast ratio of two sRGB colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _ratio(value: float) -> str:
    """A ratio as "4.49:1", rounded down: 4.499 must not read as the 4.5 it misses."""
    return f"{math.floor(value * 100) / 100:.2f}:1"


def _hex(colour: RGB) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in colour)


def _on_page(colour: RGB) -> float:
    """The lowest contrast of ``colour`` against the page's light backgrounds."""
    return min(contrast(colour, rgb(background)) for background in PAGE_BACKGROUNDS)  # type: ignore[arg-type]


def _darkened(colour: RGB, passes: float, measure: Callable[[RGB], float]) -> RGB:
    """The lightest shade of ``colour`` (3 % darker each step, on whole 8-bit values so that the shade
    written as #rrggbb is the one measured) whose ``measure`` reaches ``passes``; black reaches every
    ratio used here, so the loop ends."""
    while measure(colour) < passes:
        colour = (math.floor(colour[0] * 255 * 0.97) / 255, math.floor(colour[1] * 255 * 0.97) / 255,
                  math.floor(colour[2] * 255 * 0.97) / 255)
    return colour


def text_colours(primary: str | None) -> dict[str, str]:
    """The text colours the pages need besides their defaults: ``on_primary`` (text on the primary
    colour: dark instead of white when dark text has the higher contrast) and ``primary_text`` (links:
    a darker shade of the primary colour when it is below AA on the page's backgrounds)."""
    primary_rgb = rgb(primary) if primary else None
    if primary_rgb is None:
        return {}
    colours = {}
    ink = rgb(INK)
    assert ink is not None
    if contrast(primary_rgb, ink) > contrast(primary_rgb, _WHITE):
        colours["on_primary"] = INK
    if _on_page(primary_rgb) < AA_TEXT:
        colours["primary_text"] = _hex(_darkened(primary_rgb, AA_TEXT, _on_page))
    return colours


def contrast_warnings(primary: str | None, accent: str | None) -> list[tuple[str, str]]:
    """What the organiser should know about the theme colours: ``(key, message)`` pairs, the message
    saying the ratio reached and what the pages do about it (nothing for colours that pass)."""
    warnings: list[tuple[str, str]] = []
    primary_rgb = rgb(primary) if primary else None
    if primary and primary_rgb is not None:
        warnings += [("event.primary_color", m) for m in _primary_warnings(primary, primary_rgb)]
    accent_rgb = rgb(accent) if accent else None
    if accent_rgb is not None and _on_page(accent_rgb) < AA_NON_TEXT:
        suggestion = _hex(_darkened(accent_rgb, AA_NON_TEXT, _on_page))
        warnings.append(("event.accent_color",
                         f"{accent} has a contrast of {_ratio(_on_page(accent_rgb))} against the page's light "
                         f"background, below the {AA_NON_TEXT:g}:1 WCAG AA asks of borders and marks (the accent "
                         f"colour marks the welcome text and the share box); a darker colour such as {suggestion} "
                         f"would reach it"))
    return warnings


def _primary_warnings(name: str, primary: RGB) -> list[str]:
    colours = text_colours(name)
    ink = rgb(INK)
    assert ink is not None
    on_white, on_ink = contrast(primary, _WHITE), contrast(primary, ink)
    warnings = []
    chosen = "dark" if "on_primary" in colours else "white"
    best = max(on_white, on_ink)
    if best < AA_TEXT:
        # Mid-tones: neither text colour is readable enough. Say so, with the nearest shade that is.
        suggestion = _hex(_darkened(primary, AA_TEXT, lambda c: contrast(c, _WHITE)))
        warnings.append(f"{name}: neither white text ({_ratio(on_white)}) nor dark text ({_ratio(on_ink)}) "
                        f"on it reaches WCAG AA ({AA_TEXT:g}:1); pages use {chosen} text, the better of the two. "
                        f"Choose a darker colour such as {suggestion} (white text) or a lighter one")
    elif chosen == "dark":
        warnings.append(f"{name}: white text on it has a contrast of {_ratio(on_white)}, below WCAG AA "
                        f"({AA_TEXT:g}:1); pages use dark text {INK} on it instead ({_ratio(on_ink)})")
    if "primary_text" in colours:
        warnings.append(f"{name} as the colour of links has a contrast of {_ratio(_on_page(primary))} on "
                        f"the page's light background, below WCAG AA ({AA_TEXT:g}:1); links use the darker "
                        f"{colours['primary_text']} instead")
    return warnings
