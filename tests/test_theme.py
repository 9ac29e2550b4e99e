"""The event's theme colours keep WCAG AA contrast: the text colour with the higher contrast is chosen,
what is still below AA is said with its ratio when the config is read, CSS colour names are checked
like hex colours, and the accent colour is checked too."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.model.config import parse_config
from gateway.model.errors import InputError
from gateway.model.theme import (AA_NON_TEXT, AA_TEXT, INK, PAGE_BACKGROUNDS, contrast, contrast_warnings, rgb,
                                 text_colours)
from gateway.model.tokens import format_tokens
from tests.gateway_run import make_accounts
from tests.system import free_port

WHITE = (1.0, 1.0, 1.0)


def on_page(colour: str) -> float:
    return min(contrast(rgb(colour), rgb(background)) for background in PAGE_BACKGROUNDS)  # type: ignore[arg-type]


def text_on(primary: str) -> str:
    return text_colours(primary).get("on_primary", "#ffffff")


def test_the_default_blue_passes_as_it_is() -> None:
    assert text_colours("#1f4fd1") == {} and contrast_warnings("#1f4fd1", "#0e7c66") == []


def test_a_light_primary_gets_dark_text_and_darker_links() -> None:
    colours = text_colours("#ffcc00")
    assert colours["on_primary"] == INK
    assert on_page(colours["primary_text"]) >= AA_TEXT
    (text, links) = contrast_warnings("#ffcc00", None)
    assert text[0] == links[0] == "event.primary_color"
    assert "white text on it has a contrast of 1.51:1" in text[1] and f"dark text {INK}" in text[1]
    assert colours["primary_text"] in links[1]


@pytest.mark.parametrize(("colour", "chosen", "white", "dark"), [
    ("#7a7a7a", "white", "4.29:1", "4.14:1"),   # white is the better of two failing choices
    ("#ff0000", "dark", "3.99:1", "4.45:1"),    # dark is
])
def test_a_mid_tone_gets_the_better_text_colour_and_a_warning_with_both_ratios(
        colour: str, chosen: str, white: str, dark: str) -> None:
    assert text_on(colour) == ("#ffffff" if chosen == "white" else INK)
    (key, message), *_ = contrast_warnings(colour, None)
    assert key == "event.primary_color"
    assert f"neither white text ({white}) nor dark text ({dark})" in message and "WCAG AA (4.5:1)" in message
    assert f"pages use {chosen} text" in message
    suggestion = message.split("such as ")[1].split()[0]
    assert contrast(rgb(suggestion), WHITE) >= AA_TEXT  # type: ignore[arg-type]


def test_every_colour_gets_the_text_colour_with_the_higher_contrast_and_readable_links() -> None:
    ink = rgb(INK)
    for digits in itertools.product("0369cf", repeat=3):
        colour = "#" + "".join(digits)
        primary = rgb(colour)
        assert primary is not None
        chosen = contrast(primary, rgb(text_on(colour)))  # type: ignore[arg-type]
        assert chosen == max(contrast(primary, WHITE), contrast(primary, ink)), colour  # type: ignore[arg-type]
        links = text_colours(colour).get("primary_text", colour)
        assert on_page(links) >= AA_TEXT, colour
        warned = " ".join(message for _, message in contrast_warnings(colour, None))
        assert (chosen < AA_TEXT) == ("neither white text" in warned), colour


def test_the_accent_colour_is_checked_as_a_border() -> None:
    assert contrast_warnings(None, "#0e7c66") == []
    ((key, message),) = contrast_warnings(None, "#ffcc00")
    assert key == "event.accent_color"
    assert "1.37:1" in message and f"{AA_NON_TEXT:g}:1" in message
    suggestion = message.split("such as ")[1].split()[0]
    assert on_page(suggestion) >= AA_NON_TEXT


def test_css_colour_names_are_checked_like_hex_colours() -> None:
    assert rgb("navy") == rgb("#000080") and rgb("Yellow") == rgb("#ffff00") and rgb("rebeccapurple") is not None
    assert text_colours("yellow") == text_colours("#ffff00") and text_colours("yellow")["on_primary"] == INK
    assert [key for key, _ in contrast_warnings("white", "white")] == ["event.primary_color"] * 2 + ["event.accent_color"]
    for unknown in ("blurple", "transparent", "currentColor", "red; background:url(x)", "#12345", ""):
        assert rgb(unknown) is None, unknown


def test_colours_are_checked_when_the_config_is_read() -> None:
    config = parse_config("event:\n  title: T\n  primary_color: '#7a7a7a'\n  accent_color: yellow\n", "g.yaml")
    assert [w.split(": ")[0] for w in config.warnings] == ["g.yaml:3", "g.yaml:3", "g.yaml:4"]
    assert "neither white text (4.29:1)" in config.warnings[0] and "event.accent_color: yellow" in config.warnings[2]
    assert parse_config("event:\n  primary_color: navy\n", "g.yaml").warnings == ()
    with pytest.raises(InputError) as info:
        parse_config("event:\n  primary_color: blurple\n", "g.yaml")
    assert str(info.value) == ("g.yaml:2: event.primary_color: use a colour such as #005a9c, #fc0 or a CSS colour "
                               "name such as navy")


def test_gateway_up_says_so_before_anything_else(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens(make_accounts(1)))
    tokens.chmod(0o600)
    config = tmp_path / "gateway.yaml"
    config.write_text("event:\n  primary_color: '#ff0000'\n")
    # A listen address that is refused at once: the warning comes first, nothing starts.
    result = subprocess.run([sys.executable, "-m", "gateway", "up", str(tokens), "--config", str(config),
                             "--state-dir", str(tmp_path / "state"), "--listen", f"0.0.0.0:{free_port()}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    *warnings, refusal = result.stderr.splitlines()
    assert f"WARNING gateway {config}:2: event.primary_color: #ff0000: neither white text (3.99:1)" in warnings[0]
    assert len(warnings) == 2 and "links use the darker" in warnings[1]
    assert refusal.startswith("gateway: error: listen") and "without TLS" in refusal
