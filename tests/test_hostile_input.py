"""Hostile and malformed input: every token file or config either parses or yields PATH:LINE errors.

No value from a token file or config can add an Apache directive or a shell command.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from gateway.proxies.apache import ApacheLayout, render_apache_config
from gateway.backends.slurm_job import render_job_script
from gateway.model.config import Config, parse_config
from gateway.model.errors import InputError
from gateway.proxies.websockify import PerAccountWebsockify, SharedWebsockify
from gateway.proxies.relay import BuiltinRelay
from gateway.common.render import UnsafeValue
from gateway.cli.systemd_unit import ServiceSpec, render_service
from gateway.model.tokens import Account, parse_tokens
from gateway.web.app import reserved_segments

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


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(FILE)
def test_any_token_text_parses_or_gives_located_errors(text: str) -> None:
    """Random text: located errors only (what parses is checked below, with valid files)."""
    try:
        parse_tokens(text, "t.txt")
    except InputError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert PROBLEM_RE.match(str(problem)), str(problem)
            assert "\n" not in str(problem)


# -- generated files: valid inputs with one hostile value at a time ---------------------------------
#
# Random lines almost never parse, so the rendering branch would almost never run. These tests build
# a valid token file or config, put one hostile value into one field, and then check the whole
# generated file (Apache config, job script, systemd unit) against the same file rendered from a
# benign placeholder: the same lines, the same directives or words on each line, and the hostile value
# arriving as exactly one inert argument. Each test counts how often it rendered and requires it.

PLACEHOLDER = "PLhdrq9z"  # stands for the hostile value in the baseline rendering

HOSTILE_VALUES = [
    "ws01\nInclude /etc/passwd", "x\rInclude /etc/passwd", "x\r\nProxyPass / http://evil/", "a\\", "a\\\nb",
    '"', "'", "a b", "a\tb", "a;b", "a&&b", "a|b", "$(reboot)", "`id`", "${HOME}", "$HOME", "*", "?", "~", "#c",
    "%h", "%2e%2e", "..", "/a/../b", "<Directory />", "</Directory>", "\ufeff", "é", "\x00", "\x0b", "\x0c",
    "\x1c", "\x85", "\u2028", "", "-x", "--", "/ok/path.sif", "/a/b_c-d.e", "ws.01_a-b", "abc'def", 'ab"cd$e',
]
HOSTILE = st.one_of(st.sampled_from(HOSTILE_VALUES), st.text(max_size=12))
SOME_PASSWORD = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F) if chr(c) != "#"], min_size=6, max_size=8)


def yaml_str(value: str) -> str:
    """``value`` as a YAML double-quoted scalar that reads back exactly (every non-ASCII character escaped)."""
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif 0x20 <= ord(c) < 0x7F:
            out.append(c)
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _counted(outcomes: Counter, what: str) -> None:
    outcomes[what] += 1
    event(what)


def _require_rendered(outcomes: Counter, at_least: float = 0.2) -> None:
    total = sum(outcomes.values())
    print(f"\noutcomes: {dict(outcomes)}")
    assert total > 0 and outcomes["rendered"] >= at_least * total, dict(outcomes)


# Apache: a line is a directive and its arguments; only "\n" ends a line, a trailing "\" continues it.
APACHE_DIRECTIVES = frozenset({
    "ServerRoot", "DefaultRuntimeDir", "PidFile", "Mutex", "ErrorLog", "LogLevel", "LogFormat", "CustomLog",
    "Listen", "ServerName", "User", "Group", "LoadModule", "TypesConfig", "ServerTokens", "ServerSignature",
    "TraceEnable", "Timeout", "KeepAlive", "KeepAliveTimeout", "<IfModule", "</IfModule>", "StartServers",
    "ServerLimit", "ThreadLimit", "ThreadsPerChild", "MaxRequestWorkers", "MinSpareThreads", "MaxSpareThreads",
    "MaxConnectionsPerChild", "<Directory", "</Directory>", "Options", "AllowOverride", "Require", "SSLEngine",
    "SSLCertificateFile", "SSLCertificateKeyFile", "SSLProtocol", "SSLSessionCache", "Header", "ProxyRequests",
    "ProxyPass", "ProxyPassReverse", "Alias", "<LocationMatch", "</LocationMatch>", "LoadFile", "RequestReadTimeout",
    "RequestHeader", "QS_ErrorResponseCode", "QS_LocRequestLimit", "ErrorDocument",
})
ROUTE_RE = re.compile(r"ProxyPass (/[A-Za-z0-9._-]+)+ ws://127\.0\.0\.1:\d+"
                      r"(/|/\?token=[A-Za-z0-9_-]+|(/[A-Za-z0-9._-]+)+) retry=0 timeout=\d+( nocanon)?")


def apache_args(line: str) -> list[str]:
    """Apache's own splitting of a config line (ap_getword_conf): quoted words, backslash escapes."""
    words, i, n = [], 0, len(line)
    while True:
        while i < n and line[i] in " \t\v\f\r":
            i += 1
        if i >= n:
            return words
        if line[i] in "\"'":
            quote, i, word = line[i], i + 1, []
            while i < n and line[i] != quote:
                if line[i] == "\\" and i + 1 < n and line[i + 1] in (quote, "\\"):
                    i += 1
                word.append(line[i])
                i += 1
            i += 1
            words.append("".join(word))
        else:
            start = i
            while i < n and line[i] not in " \t\v\f\r":
                i += 1
            words.append(line[start:i])


def assert_apache_like(text: str, baseline: str, hostile: str, placeholder: str = PLACEHOLDER) -> None:
    """``text`` has the directives of ``baseline`` line by line, each with as many arguments; where an
    argument differs, it is the baseline's with the placeholder replaced by the hostile value."""
    lines, expected = text.split("\n"), baseline.split("\n")
    assert len(lines) == len(expected), "the hostile value changed the number of lines"
    for line, base in zip(lines, expected):
        assert not line.endswith("\\"), f"a line continues onto the next: {line!r}"
        if line.strip().startswith("#") and base.strip().startswith("#"):
            continue  # a comment stays a comment: it has no newline, so it cannot end
        args, base_args = apache_args(line), apache_args(base)
        assert len(args) == len(base_args), (line, base)
        if args:
            assert args[0] in APACHE_DIRECTIVES and args[0] == base_args[0], line
        for arg, base_arg in zip(args, base_args):
            if arg != base_arg and placeholder in base_arg:  # (other arguments may be random, e.g. tokens)
                expected = base_arg.replace(placeholder, hostile)
                # A directory is joined to a file name as a path ("/" + "mod_x.so" is "/mod_x.so", not "//").
                same_path = placeholder.startswith("/") and re.sub("/+", "/", arg) == re.sub("/+", "/", expected)
                assert arg == expected or same_path, (line, base)
        if line.startswith("ProxyPass /") and "ws://" in line:
            assert ROUTE_RE.fullmatch(line), line


def _token_line(fields: list[str]) -> str:
    return " ".join(fields)


@st.composite
def token_files_with_one_hostile_field(draw) -> tuple[str, list[str]]:
    count = draw(st.integers(1, 3))
    rows = [[f"ws{i:02d}", "localhost", f"/desktop/ws{i:02d}", str(6000 + i), str(5900 + i), draw(SOME_PASSWORD)]
            for i in range(1, count + 1)]
    row, column = draw(st.integers(0, count - 1)), draw(st.integers(0, 6))
    value = draw(st.one_of(HOSTILE, st.sampled_from(["127.0.0.1", "::1", "node-1.cluster", "auto", "/x/y_z",
                                                      "/desktop/a.b-c", "65535", "1024", "0", "６００１"])))
    if column == 6:
        rows[row].append(draw(st.sampled_from(["", "backend=", "protocol=", "gpu="])) + value)
    else:
        rows[row][column] = value
    # The passwords to look for in Apache's config: those that no other field happens to contain.
    others = " ".join(f for r in rows for i, f in enumerate(r) if i != 5)
    return "\n".join(_token_line(r) for r in rows), [r[5] for r in rows if r[5] not in others]


def _all_routes(config: Config, accounts) -> dict[str, list]:
    return {
        "per-account": PerAccountWebsockify(config, Path("/tmp")).routes(accounts),
        "shared": SharedWebsockify(config, Path("/tmp"), Path("/tmp")).routes(accounts),
        "builtin": BuiltinRelay(config, {}).routes(accounts),
    }


def _private_apache(config: Config, routes) -> str:
    return render_apache_config(config, routes, web_port=8081, layout=ApacheLayout(Path("/srv/gw/state/apache")),
                                listen=config.listen)


SHARED_PORT_CONFIG = "proxy:\n  shared_port: 7000\n"


def test_token_files_with_one_hostile_field_parse_or_render_only_our_directives() -> None:
    outcomes: Counter = Counter()
    config = parse_config(SHARED_PORT_CONFIG)

    # derandomize: the share of files that render must not depend on the day's draw (once 28 of 300
    # rendered against a floor of 30); the hostile values themselves stay varied across the 300.
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None, database=None,
              derandomize=True)
    @given(token_files_with_one_hostile_field())
    def check(case: tuple[str, list[str]]) -> None:
        text, passwords = case
        try:
            tokens = parse_tokens(text, "t.txt")
        except InputError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert PROBLEM_RE.match(str(problem)), str(problem)
                assert "\n" not in str(problem)
            _counted(outcomes, "refused")
            return
        _counted(outcomes, "rendered")
        benign = parse_tokens("\n".join(f"ws{i:02d} localhost /desktop/ws{i:02d} {6000 + i} {5900 + i} abcdefgh"
                                        for i in range(1, len(tokens.accounts) + 1)), "b.txt")
        hostile_routes, benign_routes = _all_routes(config, tokens.accounts), _all_routes(config, benign.accounts)
        for mode in hostile_routes:
            rendered = _private_apache(config, hostile_routes[mode])
            # Paths and ports legitimately differ from the benign file: compare directives and arguments.
            lines, expected = rendered.split("\n"), _private_apache(config, benign_routes[mode]).split("\n")
            assert len(lines) == len(expected), mode
            for line, base in zip(lines, expected):
                assert not line.endswith("\\"), line
                if line.strip().startswith("#"):
                    assert base.strip().startswith("#"), line
                    continue
                args, base_args = apache_args(line), apache_args(base)
                assert len(args) == len(base_args), (mode, line, base)
                if args:
                    assert args[0] in APACHE_DIRECTIVES and args[0] == base_args[0], line
                if line.startswith("ProxyPass /") and "ws://" in line:
                    assert ROUTE_RE.fullmatch(line), line
            # Passwords go to vncpasswd's stdin only, never into Apache's configuration.
            assert not any(p in rendered for p in passwords if len(p) >= 6)

    check()
    _require_rendered(outcomes, at_least=0.1)


# Config values that reach Apache's configuration, each with a benign placeholder of its kind.
APACHE_CONFIG_FIELDS = {
    "apache.user": ("apache:\n  user: {}\n", PLACEHOLDER),
    "apache.group": ("apache:\n  group: {}\n", PLACEHOLDER),
    "apache.mime_types": ("apache:\n  mime_types: {}\n", "/" + PLACEHOLDER),
    "apache.modules_dir": ("apache:\n  modules_dir: {}\n", "/" + PLACEHOLDER),
    "tls.cert": ("tls:\n  cert: {}\n  key: /k.pem\n", "/" + PLACEHOLDER),
    "tls.key": ("tls:\n  cert: /c.pem\n  key: {}\n", "/" + PLACEHOLDER),
}


def _apache_config_case(field_name: str, value: str) -> None:
    template, placeholder = APACHE_CONFIG_FIELDS[field_name]
    try:
        config = parse_config(template.format(yaml_str(value)), "g.yaml")
        benign = parse_config(template.format(yaml_str(placeholder)), "g.yaml")
        tokens = parse_tokens("ws01 localhost /desktop/ws01 6001 5901 abcdefgh", "t.txt")
        rendered = _private_apache(config, PerAccountWebsockify(config, Path("/tmp")).routes(tokens.accounts))
    except InputError as exc:
        assert all(CONFIG_PROBLEM_RE.match(str(p)) for p in exc.problems), exc.problems
        raise _Refused() from None
    except UnsafeValue:
        raise _Refused() from None
    baseline = _private_apache(benign, PerAccountWebsockify(benign, Path("/tmp")).routes(tokens.accounts))
    assert_apache_like(rendered, baseline, value, placeholder)


class _Refused(Exception):
    pass


def test_config_values_with_one_hostile_field_render_only_our_directives() -> None:
    outcomes: Counter = Counter()

    @settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None, database=None)
    @given(st.sampled_from(sorted(APACHE_CONFIG_FIELDS)), HOSTILE)
    @example("apache.user", "www-data\nInclude /etc/passwd")
    def check(field_name: str, value: str) -> None:
        try:
            _apache_config_case(field_name, value)
        except _Refused:
            _counted(outcomes, "refused")
            return
        _counted(outcomes, "rendered")

    check()
    _require_rendered(outcomes)


# Shell: words are split on blanks and operators; quoting decides which characters are literal.
SHELL_OPERATORS = frozenset(";&|()<>")
SHELL_SAFE = frozenset(string.ascii_letters + string.digits + "@%+=:,./_-")


def shell_words(line: str) -> list[list[tuple[str, bool]]]:
    """One line of a bash script as words of (character, literal) pairs; each operator character is a
    word of its own, and a comment is one last word."""
    words: list[list[tuple[str, bool]]] = []
    word: list[tuple[str, bool]] | None = None
    i, n = 0, len(line)

    def end() -> None:
        nonlocal word
        if word is not None:
            words.append(word)
        word = None

    while i < n:
        c = line[i]
        if c in " \t":
            end()
        elif c == "#" and word is None:
            words.append([(ch, True) for ch in line[i:]])
            return words
        elif c in SHELL_OPERATORS:
            end()
            words.append([(c, False)])
        elif c == "\\" and i + 1 < n:
            word = (word or []) + [(line[i + 1], True)]
            i += 1
        elif c == "'":
            j = line.index("'", i + 1)  # ValueError: an unterminated quote
            word = (word or []) + [(ch, True) for ch in line[i + 1:j]]
            i = j
        elif c == '"':
            word = word or []
            i += 1
            while line[i] != '"':  # IndexError: an unterminated quote
                if line[i] == "\\" and line[i + 1] in '$`"\\':
                    word.append((line[i + 1], True))
                    i += 1
                else:
                    word.append((line[i], line[i] not in "$`\\!"))
                i += 1
        else:
            word = (word or []) + [(c, False)]
        i += 1
    end()
    return words


def assert_shell_like(script: str, baseline: str, hostile: str, placeholder: str) -> None:
    """``script`` has ``baseline``'s lines and words; a word that differs is the baseline's with the
    placeholder replaced by the hostile value, and none of its characters is left to the shell."""
    lines, expected = script.split("\n"), baseline.split("\n")
    assert len(lines) == len(expected), "the hostile value changed the number of lines"
    for line, base in zip(lines, expected):
        words, base_words = shell_words(line), shell_words(base)
        assert len(words) == len(base_words), (line, base)
        for word, base_word in zip(words, base_words):
            if word == base_word or (word[:1] == base_word[:1] == [("#", True)]):
                continue
            text, base_text = "".join(c for c, _ in word), "".join(c for c, _ in base_word)
            assert base_text.replace(placeholder, hostile) == text, (line, base)
            loose = [c for c, literal in word if not literal and c not in SHELL_SAFE]
            assert not loose, f"{loose} left to the shell in {line!r}"


JOB_FIELDS = {
    # name: (config template, benign placeholder); "{}" is the value as a YAML (JSON) string
    "desktop.session[0]": ("desktop:\n  session: [{}, --opt]\n", "/" + PLACEHOLDER),
    "desktop.session[1]": ("desktop:\n  session: [/bin/session, {}]\n", PLACEHOLDER),
    "container.image": ("container:\n  runtime: singularity\n  image: {}\n", "/" + PLACEHOLDER + ".sif"),
    "container.binds": ("container:\n  runtime: singularity\n  image: /i.sif\n  binds: [{}]\n", "/" + PLACEHOLDER),
    "desktop.keyboard_layout": ("desktop:\n  keyboard_layout: {}\n", "plhdrq"),
    "desktop.geometry": ("desktop:\n  geometry: {}\n", "1234x567"),
    "slurm.interface": ("slurm:\n  interface: {}\n", "10.9.8.7"),
    "home": ("", "/" + PLACEHOLDER),
    "workdir": ("", "/" + PLACEHOLDER),
    "secret_file": ("", "/" + PLACEHOLDER),
}


def _job_script(field_name: str, value: str) -> str:
    template, _ = JOB_FIELDS[field_name]
    config = parse_config(template.format(yaml_str(value)) if template else "", "g.yaml")
    paths = {"home": "/h/ws01", "workdir": "/w/ws01", "secret_file": "/w/ws01/.vnc-secret"}
    if field_name in paths:
        paths[field_name] = value
    account = Account("ws01", "auto", "/desktop/ws01", 6001, 5901, "abcdefgh", 1)
    return render_job_script(config, account, **paths)


def test_job_scripts_with_one_hostile_value_keep_every_value_one_quoted_word() -> None:
    outcomes: Counter = Counter()

    @settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow], deadline=None, database=None)
    @given(st.sampled_from(sorted(JOB_FIELDS)), st.one_of(HOSTILE, st.sampled_from(["de", "fr(azerty)", "us,de",
                                                                                     "1920x1080", "127.0.0.1"])))
    @example("home", "/h/x'; reboot; '")
    @example("desktop.session[0]", "$(reboot)")
    def check(field_name: str, value: str) -> None:
        assume(value or field_name != "desktop.keyboard_layout")  # empty: the default, and no line for it
        try:
            script = _job_script(field_name, value)
        except InputError as exc:
            assert all(CONFIG_PROBLEM_RE.match(str(p)) for p in exc.problems), exc.problems
            _counted(outcomes, "refused")
            return
        except UnsafeValue:
            _counted(outcomes, "refused")
            return
        _counted(outcomes, "rendered")
        assert_shell_like(script, _job_script(field_name, JOB_FIELDS[field_name][1]), value,
                          JOB_FIELDS[field_name][1])
        assert "abcdefgh" not in script  # the password stays in the secret file

    check()
    _require_rendered(outcomes)


SYSTEMD_PLAIN = r'[^\s"\'\\$%]+'
SYSTEMD_QUOTED = r'"[^"\\$%\n]*"'
SYSTEMD_WORDS = re.compile(rf"(?:{SYSTEMD_PLAIN}|{SYSTEMD_QUOTED})(?: (?:{SYSTEMD_PLAIN}|{SYSTEMD_QUOTED}))*")


def systemd_words(value: str) -> list[str]:
    """systemd's split of ExecStart= and ReadWritePaths= for the subset the gateway writes: plain
    words, or double-quoted words without escapes or specifiers."""
    assert SYSTEMD_WORDS.fullmatch(value), value
    return [w[1:-1] if w.startswith('"') else w for w in re.findall(rf"{SYSTEMD_QUOTED}|{SYSTEMD_PLAIN}", value)]


def unit_settings(text: str) -> dict[str, str]:
    return {line.partition("=")[0]: line.partition("=")[2] for line in text.split("\n")
            if "=" in line and not line.startswith(("#", "["))}


def unit_keys(text: str) -> list[str]:
    keys = []
    for line in text.split("\n"):
        assert not line.endswith("\\"), f"a line continues onto the next: {line!r}"
        if line and not line.startswith("#"):
            keys.append(line if line.startswith("[") else line.partition("=")[0])
    return keys


def test_systemd_units_with_one_hostile_path_keep_the_units_lines_and_argv() -> None:
    outcomes: Counter = Counter()
    benign = render_service(ServiceSpec(tokens=Path("/t.txt"), config=Path("/g.yaml"), listen="127.0.0.1:8080"))
    baseline = unit_keys(benign)
    for key in ("ExecStart", "ReadWritePaths", "ProtectSystem", "KillMode"):
        assert baseline.count(key) == 1, f"{key} is not a setting of its own in:\n{benign}"
    writable = systemd_words(unit_settings(benign)["ReadWritePaths"])
    assert "/var/lib/workshop-gateway" in writable

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None, database=None)
    @given(st.sampled_from(["tokens", "config", "listen"]), HOSTILE)
    @example("tokens", "x\nExecStartPre=/bin/touch /tmp/pwned")
    @example("config", "a%h")
    def check(field_name: str, value: str) -> None:
        values = {"tokens": Path("/t.txt"), "config": Path("/g.yaml"), "listen": "127.0.0.1:8080"}
        values[field_name] = Path("/srv/" + value) if field_name != "listen" else value
        spec = ServiceSpec(**values)
        try:
            unit = render_service(spec)
        except UnsafeValue:
            _counted(outcomes, "refused")
            return
        _counted(outcomes, "rendered")
        assert unit_keys(unit) == baseline
        assert systemd_words(unit_settings(unit)["ExecStart"]) == spec.argv()
        assert systemd_words(unit_settings(unit)["ReadWritePaths"]) == writable

    check()
    _require_rendered(outcomes)


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
        tokens = parse_tokens(line, "t.txt", reserved_routes=reserved_segments())
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
    "event:\n  primary_color: \"red; background:url(x)\"\n",
])
def test_hostile_config_values_are_refused_or_escaped(text: str) -> None:
    try:
        config = parse_config(text, "g.yaml")
    except InputError as exc:
        assert all(CONFIG_PROBLEM_RE.match(str(p)) for p in exc.problems)
        return
    # Titles are shown in HTML pages, which are autoescaped (checked in test_web_hostile).
    assert config.event.title.startswith("</title>")


@pytest.mark.parametrize("key", ["binary", "user", "group", "mime_types", "modules_dir"])
def test_an_apache_value_with_a_newline_is_refused_with_its_line(key: str) -> None:
    with pytest.raises(InputError) as refused:
        parse_config(f"apache:\n  {key}: \"/usr/sbin/apache2\\nInclude /etc/passwd\"\n", "g.yaml")
    assert [str(p) for p in refused.value.problems if str(p).startswith(f"g.yaml:2: apache.{key}")], \
        refused.value.problems
