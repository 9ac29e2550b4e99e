"""The event's theme colours, kept readable: text on the primary colour meets WCAG AA contrast."""

from __future__ import annotations

import re

__all__ = ["AA_CONTRAST", "contrast", "rgb", "theme_colours"]

_HEX_RE = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
AA_CONTRAST = 4.5  # WCAG 2 AA for normal text


def rgb(colour: str) -> tuple[float, float, float] | None:
    """``#rgb`` or ``#rrggbb`` as sRGB components from 0 to 1; None for anything else (a colour name)."""
    match = _HEX_RE.fullmatch(colour.strip())
    if match is None:
        return None
    digits = match[1] if len(match[1]) == 6 else "".join(c * 2 for c in match[1])
    return tuple(int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


def _luminance(colour: tuple[float, float, float]) -> float:
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in colour]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """WCAG contrast ratio of two sRGB colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _hex(colour: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in colour)


def theme_colours(primary: str | None) -> tuple[dict[str, str], list[str]]:
    """Text colours that stay readable on the event's primary colour (AA), and warnings for the log.

    White text sits on the primary colour (header, buttons) and the primary colour is the text of links
    on white: a light primary gets dark text on it, and links a darkened shade of it."""
    white, ink = (1.0, 1.0, 1.0), (0.078, 0.094, 0.122)  # --text: #14181f
    primary_rgb = rgb(primary) if primary else None
    if primary_rgb is None:
        return {}, []
    colours, warnings = {}, []
    if contrast(primary_rgb, white) < AA_CONTRAST:
        on = "#ffffff" if contrast(primary_rgb, white) >= contrast(primary_rgb, ink) else "#14181f"
        colours["on_primary"] = on
        darker = primary_rgb
        while contrast(darker, white) < AA_CONTRAST:
            darker = tuple(c * 0.9 for c in darker)  # type: ignore[assignment]
        colours["primary_text"] = _hex(darker)
        warnings.append(f"event.primary_color {primary}: white text on it has a contrast of "
                        f"{contrast(primary_rgb, white):.1f}:1, below WCAG AA ({AA_CONTRAST}:1); pages use {on} text "
                        f"on it and {colours['primary_text']} for links instead")
    return colours, warnings
