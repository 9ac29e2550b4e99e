"""Hostile and malformed input: every token file or config either parses or yields PATH:LINE errors.

No value from a token file or config can add an Apache directive or a shell command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.apache import render_apache_config
from gateway.config import Config, parse_config
from gateway.errors import InputError
from gateway.proxy import PerAccountWebsockify
from gateway.tokens import parse_tokens

PROBLEM_RE = re.compile(r"^t\.txt:\d+: \S.*$")
CONFIG_PROBLEM_RE = re.compile(r"^g\.yaml:\d+: \S.*$")

FIELD = st.one_of(
    st.sampled_from(["ws01", "localhost", "127.0.0.1", "/desktop/ws01", "6001", "5901", "abcdefg", "auto",
                     "backend=ssh", "..", "%2e%2e", '"', "<", "%", "\\", "ProxyPass", "\ufeff", "ｗｓ０１",
                     "65536", "0", "1023", "1024", "65535", "a" * 65, "é", "\t"]),
    st.text(min_size=1, max_size=12),
)
LINE = st.lists(FIELD, min_size=0, max_size=8).map(" ".join)
FILE = st.lists(LINE, min_size=0, max_size=6).map(lambda lines: "\n".join(lines))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(FILE)
def test_any_token_text_parses_or_gives_located_errors(text: str) -> None:
    try:
        tokens = parse_tokens(text, "t.txt")
    except InputError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert PROBLEM_RE.match(str(problem)), str(problem)
            assert "\n" not in str(problem)
        return
    # Whatever parsed renders into Apache rules that contain only what we wrote.
    text_out = render_apache_config(Config(), PerAccountWebsockify(Config(), Path("/tmp")).routes(tokens.accounts),
                                    web_port=8081, layout=None, listen="127.0.0.1:8080")
    for line in text_out.splitlines():
        if line.startswith("ProxyPass /") and "ws://" in line:
            assert re.fullmatch(r"ProxyPass (/[A-Za-z0-9._-]+)+ ws://127\.0\.0\.1:\d+/ retry=0 timeout=\d+", line), line


YAML_VALUE = st.one_of(
    st.sampled_from(["", "null", "[]", "{}", "- a", "1", "-1", "1.5", "yes", "'x'", '"#"', "[a, b]", "{a: 1}",
                     "1280x800", "private", "system", "&a x", "*a", "!!python/object:os.system x", "'\n'"]),
    st.text(max_size=10),
)
KEY = st.sampled_from(["listen", "desktop", "geometry", "session", "apache", "mode", "tls", "cert", "event",
                       "title", "proxy", "heartbeat_s", "restart", "max_attempts", "bogus"])


@st.composite
def yaml_documents(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        indent = draw(st.sampled_from(["", "  ", "    "]))
        lines.append(f"{indent}{draw(KEY)}: {draw(YAML_VALUE)}")
    return "\n".join(lines)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(yaml_documents())
def test_any_config_parses_or_gives_located_errors(text: str) -> None:
    try:
        config = parse_config(text, "g.yaml")
    except InputError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert CONFIG_PROBLEM_RE.match(str(problem)), str(problem)
        return
    assert isinstance(config, Config)


NASTY_TOKEN_LINES = [
    "ws01 localhost /desktop/ws01\nInclude /etc/passwd 6001 5901 abcdefg",
    'ws01 localhost "/desktop/ws01" 6001 5901 abcdefg',
    "ws01 localhost /desktop/ws01%0aProxyPass 6001 5901 abcdefg",
    "ws01 localhost /desktop/<script> 6001 5901 abcdefg",
    "ws01 local;host /desktop/ws01 6001 5901 abcdefg",
    "ws01 $(reboot) /desktop/ws01 6001 5901 abcdefg",
    "ws01 localhost /desktop/ws01 6001 5901 abc'def",  # a quote in a password is fine: it never reaches a file
    "ｗｓ０１ localhost /desktop/ws01 6001 5901 abcdefg",
    "ws01 localhost /desktop/ws01 ６００１ 5901 abcdefg",
    "ws01 localhost /desktop/ws01 6001 5901 pässwörd",
    "ws01 localhost /admin/x 6001 5901 abcdefg",
]


@pytest.mark.parametrize("line", NASTY_TOKEN_LINES)
def test_injection_attempts_are_refused_or_harmless(line: str) -> None:
    try:
        tokens = parse_tokens(line, "t.txt")
    except InputError as exc:
        assert all(PROBLEM_RE.match(str(p)) for p in exc.problems)
        return
    (account,) = tokens.accounts
    # The only accepted case: a quote inside the password, which is written through vncpasswd's stdin.
    assert account.password == "abc'def"
    rules = render_apache_config(Config(), PerAccountWebsockify(Config(), Path("/tmp")).routes(tokens.accounts),
                                 web_port=8081, layout=None, listen="127.0.0.1:8080")
    assert "abc'def" not in rules


@pytest.mark.parametrize("text", [
    "event:\n  title: \"</title><script>alert(1)</script>\"\n",
    "apache:\n  binary: \"/usr/sbin/apache2\\nInclude /etc/passwd\"\n",
    "event:\n  primary_color: \"red; background:url(x)\"\n",
])
def test_hostile_config_values_are_refused_or_escaped(text: str) -> None:
    try:
        config = parse_config(text, "g.yaml")
    except InputError as exc:
        assert all(CONFIG_PROBLEM_RE.match(str(p)) for p in exc.problems)
        return
    # Titles are shown in HTML pages, which are autoescaped (checked in test_web_hostile).
    assert config.event.title.startswith("</title>") or "\n" in config.apache.binary
