"""The token file: one workshop account per line.

Format (whitespace-separated, ``#`` starts a comment)::

    # account   vnchost    websocketpath   websocketport  vncport  vncpassword  [key=value ...]
    ws01        localhost  /desktop/ws01   6001           5901     k3Rf9xQa

Parsing never stops at the first problem: every problem is collected as ``PATH:LINE: message`` so
that an organiser fixes the whole file in one go.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.model.errors import InputError, Problem

__all__ = [
    "Account",
    "ACCOUNT_ID_RE",
    "TokenFile",
    "parse_tokens",
    "load_tokens",
    "generate_tokens",
    "format_tokens",
    "LOCAL_HOSTS",
    "AUTO_HOST",
    "is_local_host",
    "generate_password",
]

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
AUTO_HOST = "auto"

#: Keys allowed as trailing ``key=value`` fields, with the values each accepts (None: free-form,
#: validated by the feature that reads it).
EXTRA_KEYS: dict[str, frozenset[str] | None] = {
    "backend": frozenset({"local", "slurm", "ssh"}),
    "protocol": frozenset({"vnc", "dcv", "auto"}),
    "gpu": frozenset({"yes", "no"}),
}

#: The one pattern of an account id (the token file, sign-in, routes with an account in them): it
#: becomes a path part (workspaces, archives, files), so it never starts with "." ("." and ".." are
#: never a path part) and never holds a "/".
ACCOUNT_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PRINTABLE_NO_SPACE = frozenset(chr(c) for c in range(0x21, 0x7F))
PASSWORD_MIN, PASSWORD_MAX = 6, 8


@dataclass(frozen=True, slots=True)
class Account:
    """One participant's desktop as the token file describes it."""

    id: str
    vnc_host: str
    websocket_path: str  # normalised: leading "/", no trailing "/"
    websocket_port: int
    vnc_port: int
    password: str = field(repr=False)  # never in repr: reprs end up in logs
    line: int = 0
    extras: tuple[tuple[str, str], ...] = ()

    @property
    def is_local(self) -> bool:
        return is_local_host(self.vnc_host)

    def extra(self, key: str, default: str | None = None) -> str | None:
        return dict(self.extras).get(key, default)


@dataclass(frozen=True, slots=True)
class TokenFile:
    path: str
    accounts: tuple[Account, ...]
    warnings: tuple[str, ...] = ()

    def by_id(self) -> dict[str, Account]:
        return {a.id: a for a in self.accounts}


def is_local_host(host: str) -> bool:
    return host in LOCAL_HOSTS


def load_tokens(path: str | os.PathLike[str], *, reserved_routes: frozenset[str]) -> TokenFile:
    """Read and validate a token file; raise :class:`InputError` listing every problem.

    ``reserved_routes``: the first path segments the web app serves itself (computed from its route
    table by :func:`gateway.web.app.reserved_segments`); a websocket path may not start with one.
    """
    shown = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError([Problem(shown, 0, f"cannot read token file: {exc.strerror}")]) from None
    warnings = _permission_warnings(Path(path))
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM from editors on Windows
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError([Problem(shown, line, "not valid UTF-8 text")]) from None
    tokens = parse_tokens(text, shown, reserved_routes=reserved_routes)
    return TokenFile(tokens.path, tokens.accounts, tuple(warnings))


def _permission_warnings(path: Path) -> list[str]:
    try:
        mode = path.stat().st_mode
    except OSError:
        return []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [f"{path}: token file holds passwords but is readable by others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"]
    return []


def parse_tokens(text: str, path: str = "<tokens>", *, reserved_routes: frozenset[str] = frozenset()) -> TokenFile:
    """Parse token-file text; raise :class:`InputError` with every problem found."""
    problems: list[Problem] = []
    accounts: list[Account] = []
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        account = _parse_line(content, path, number, problems, reserved_routes)
        if account is not None:
            accounts.append(account)
    problems.extend(_cross_check(accounts, path))
    if not accounts and not problems:
        problems.append(Problem(path, 0, "no accounts: the file has no token lines"))
    if problems:
        problems.sort(key=lambda p: p.line)
        raise InputError(problems)
    return TokenFile(path, tuple(accounts))


def _parse_line(content: str, path: str, number: int, problems: list[Problem],
                reserved_routes: frozenset[str]) -> Account | None:
    fields = content.split()
    if len(fields) < 6:
        problems.append(Problem(path, number, f"expected 6 fields (account vnchost websocketpath "
                                              f"websocketport vncport vncpassword), found {len(fields)}"))
        return None
    before = len(problems)

    def bad(message: str) -> None:
        problems.append(Problem(path, number, message))

    account_id, host, ws_path, ws_port, vnc_port, password = fields[:6]
    if not ACCOUNT_ID_RE.fullmatch(account_id):
        bad(f"account {_show(account_id)}: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with .")
    if not _valid_host(host):
        bad(f"vnchost {_show(host)} is not a host name or IP address")
    path_norm = _normalise_path(ws_path, bad, reserved_routes)
    ws_port_n = _port(ws_port, "websocketport", 1024, bad)
    vnc_port_n = _port(vnc_port, "vncport", 1, bad)
    _check_password(password, bad)
    extras = _parse_extras(fields[6:], bad)
    if len(problems) > before:
        return None
    assert path_norm is not None and ws_port_n is not None and vnc_port_n is not None
    return Account(account_id, host.lower(), path_norm, ws_port_n, vnc_port_n, password, number, extras)


def _show(value: str) -> str:
    """Quote a value for an error message without echoing control characters."""
    return repr(value[:80])


def _valid_host(host: str) -> bool:
    if host == AUTO_HOST:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME_RE.fullmatch(host))


def _normalise_path(raw: str, bad, reserved_routes: frozenset[str]) -> str | None:
    segments = raw.strip("/").split("/") if raw.strip("/") else []
    if not segments:
        bad(f"websocketpath {_show(raw)} is empty")
        return None
    if raw.endswith("/") or "//" in raw:
        bad(f"websocketpath {_show(raw)} has an empty segment")
        return None
    for segment in segments:
        if segment in (".", ".."):
            bad(f"websocketpath {_show(raw)}: '.' and '..' segments are not allowed")
            return None
        if not _SEGMENT_RE.fullmatch(segment):
            bad(f"websocketpath {_show(raw)}: segments may use only A-Z a-z 0-9 . _ -")
            return None
    if segments[0] in reserved_routes:
        bad(f"websocketpath {_show(raw)} collides with the gateway's own route /{segments[0]}")
        return None
    return "/" + "/".join(segments)


def _port(raw: str, name: str, lowest: int, bad) -> int | None:
    if not raw.isascii() or not raw.isdigit():
        bad(f"{name} {_show(raw)} is not a number")
        return None
    value = int(raw)
    if not lowest <= value <= 65535:
        bad(f"{name} {value} is out of range {lowest}-65535")
        return None
    return value


def _check_password(password: str, bad) -> None:
    if not set(password) <= _PRINTABLE_NO_SPACE:
        bad("vncpassword must be printable ASCII without spaces")
    elif len(password) < PASSWORD_MIN:
        bad(f"vncpassword is too short ({len(password)} characters, at least {PASSWORD_MIN})")
    elif len(password) > PASSWORD_MAX:
        bad(f"vncpassword is too long ({len(password)} characters): VNC authentication uses only "
            f"the first {PASSWORD_MAX}, so a longer one would be silently cut")


def _parse_extras(fields: Iterable[str], bad) -> tuple[tuple[str, str], ...]:
    extras: dict[str, str] = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep:
            bad(f"unexpected field {_show(item)}: extra fields must be key=value")
            continue
        if key not in EXTRA_KEYS:
            bad(f"unknown key {_show(key)} (known: {', '.join(sorted(EXTRA_KEYS))})")
            continue
        allowed = EXTRA_KEYS[key]
        if allowed is not None and value not in allowed:
            bad(f"{key}={_show(value)}: expected one of {', '.join(sorted(allowed))}")
            continue
        if key in extras:
            bad(f"{key} is given twice")
            continue
        extras[key] = value
    return tuple(sorted(extras.items()))


def _cross_check(accounts: list[Account], path: str) -> list[Problem]:
    """Uniqueness rules across lines: ids, paths, websocket ports, VNC ports per host."""
    problems: list[Problem] = []
    problems += _duplicates(accounts, path, lambda a: a.id.lower(), "account {} already on line {}")
    problems += _duplicates(accounts, path, lambda a: a.websocket_path, "websocketpath {} already on line {}")
    problems += _duplicates(accounts, path, lambda a: a.websocket_port, "websocketport {} already on line {}")
    problems += _duplicates([a for a in accounts if a.vnc_host != AUTO_HOST], path, _vnc_endpoint_key,
                            "vncport {} on this host already on line {}")
    problems += _auto_port_clashes(accounts, path)
    # websockify listens on the gateway host; a local VNC server on the same port would clash.
    local_vnc = {a.vnc_port: a for a in accounts if a.is_local}
    for account in accounts:
        clash = local_vnc.get(account.websocket_port)
        if clash is not None:
            problems.append(Problem(path, account.line, f"websocketport {account.websocket_port} "
                                    f"is the VNC port of local account {clash.id} (line {clash.line})"))
    return problems


def _auto_port_clashes(accounts: list[Account], path: str) -> list[Problem]:
    """An ``auto`` desktop may land on any reserved node, next to any other ``auto`` desktop (checked
    by the per-host rule) and next to the desktops pinned to that node: its VNC port must differ
    from theirs too. Pinned means a named cluster host served by Slurm (no ``backend=``, or
    ``backend=slurm``)."""
    problems: list[Problem] = []
    first_auto: dict[int, Account] = {}
    for account in accounts:
        if account.vnc_host != AUTO_HOST:
            continue
        earlier = first_auto.setdefault(account.vnc_port, account)
        if earlier is not account:
            problems.append(Problem(path, account.line, f"vncport {account.vnc_port} is also used by "
                                    f"{earlier.id} on line {earlier.line}: desktops with vnchost auto may "
                                    f"share a node, so their VNC ports must differ"))
    pinned = [a for a in accounts
              if a.vnc_host != AUTO_HOST and not a.is_local and a.extra("backend") in (None, "slurm")]
    seen_pinned: dict[int, Account] = {}
    for account in pinned:
        seen_pinned.setdefault(account.vnc_port, account)
    for port, auto in first_auto.items():
        other = seen_pinned.get(port)
        if other is None:
            continue
        later, earlier = (auto, other) if auto.line > other.line else (other, auto)
        problems.append(Problem(path, later.line, f"vncport {port} is also used by {earlier.id} on line "
                                f"{earlier.line}: desktops with vnchost auto may land on any node, so their "
                                f"VNC ports must differ from every auto and pinned desktop's"))
    return problems


def _vnc_endpoint_key(account: Account) -> tuple[str, int]:
    # All local spellings are one host; any two "auto" desktops may land on the same node.
    host = "localhost" if account.is_local else account.vnc_host
    return (host, account.vnc_port)


def _duplicates(accounts: list[Account], path: str, key, message: str) -> list[Problem]:
    seen: dict[object, Account] = {}
    problems = []
    for account in accounts:
        k = key(account)
        if k in seen:
            shown = k[1] if isinstance(k, tuple) else k
            problems.append(Problem(path, account.line, message.format(shown, seen[k].line)))
        else:
            seen[k] = account
    return problems


# -- generation ----------------------------------------------------------------------------------

# Letters and digits only, without look-alikes (0/O, 1/l/I), so passwords survive being read aloud.
_PASSWORD_ALPHABET = "".join(c for c in string.ascii_letters + string.digits if c not in "0O1lI")


def generate_password(length: int = PASSWORD_MAX) -> str:
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(length))


def generate_tokens(
    count: int,
    *,
    host: str = "localhost",
    prefix: str = "ws",
    first_websocket_port: int | None = None,
    first_vnc_port: int = 5901,
    path_prefix: str = "desktop",
) -> list[Account]:
    """Make ``count`` valid accounts with random passwords.

    Websocket ports start, by default, right after the VNC port range and at 6001 at the earliest,
    so the two ranges never overlap on the gateway host.
    """
    if count < 1:
        raise ValueError("--count must be at least 1")
    if first_websocket_port is None:
        first_websocket_port = max(6001, first_vnc_port + count)
    width = max(2, len(str(count)))
    accounts = [
        Account(
            id=f"{prefix}{i:0{width}d}",
            vnc_host=host,
            websocket_path=f"/{path_prefix}/{prefix}{i:0{width}d}",
            websocket_port=first_websocket_port + i - 1,
            vnc_port=first_vnc_port + i - 1,
            password=generate_password(),
            line=i,
        )
        for i in range(1, count + 1)
    ]
    # Generated output must pass our own validation (ports in range, no clashes, valid ids).
    parse_tokens(format_tokens(accounts), "<generated>")
    return accounts


def format_tokens(accounts: Iterable[Account]) -> str:
    lines = ["# account  vnchost  websocketpath  websocketport  vncport  vncpassword"]
    for a in accounts:
        extras = "".join(f" {k}={v}" for k, v in a.extras)
        lines.append(f"{a.id} {a.vnc_host} {a.websocket_path} {a.websocket_port} {a.vnc_port} {a.password}{extras}")
    return "\n".join(lines) + "\n"
