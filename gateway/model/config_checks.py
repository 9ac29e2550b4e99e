"""The rules between and within configuration values that types alone don't express.

:func:`semantic_problems` runs once a YAML file has been read into a :class:`Config` (each problem
as ``PATH:LINE: key: message``); the helpers after it are also used where the values are applied
(the listen address, the event's moments, the SMTP URL).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping

from gateway.model.config_schema import Config, DcvConfig, SshConfig
from gateway.model.container import validate_bind
from gateway.model.errors import Problem
from gateway.model.theme import contrast_warnings, rgb

__all__ = [
    "semantic_problems",
    "config_warnings",
    "parse_moment",
    "is_loopback_host",
    "public_listen_problem",
    "public_signup_problem",
    "parse_listen",
    "parse_notify_url",
    "KEYBOARD_LAYOUT_RE",
    "AUTO_INTERFACE",
    "is_interface",
    "is_wildcard_address",
]

#: Reports a problem with ``key`` unless ``ok``.
Check = Callable[[bool, str, str], None]

_UNIX_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_USER_PREFIX_RE = re.compile(r"[a-z][a-z0-9_.-]{0,15}")
_GEOMETRY_RE = re.compile(r"([1-9][0-9]{2,4})x([1-9][0-9]{2,4})")
_LAYOUT = r"[a-z]{2,8}(?:\([A-Za-z0-9_-]+\))?"
#: One XKB layout, optionally with its variant: "us", "de(nodeadkeys)" (a participant's choice).
KEYBOARD_LAYOUT_RE = re.compile(_LAYOUT)
#: The config's default may list several, as setxkbmap takes them: "us,de".
_LAYOUT_LIST_RE = re.compile(rf"{_LAYOUT}(?:,{_LAYOUT})*")


def semantic_problems(config: Config, path: str, lines: Mapping[str, int]) -> list[Problem]:
    """Rules between and within values that types alone don't express."""
    problems: list[Problem] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(Problem(path, lines.get(key, 0), f"{key}: {message}"))

    d = config.desktop
    for key, argv in (("desktop.session", d.session), ("apache.configtest_command", config.apache.configtest_command),
                      ("apache.reload_command", config.apache.reload_command)):
        check(bool(argv) and bool(argv[0]), key, "must name a program, e.g. [program, --option]")
    check(bool(_GEOMETRY_RE.fullmatch(d.geometry)), "desktop.geometry", "use WIDTHxHEIGHT, e.g. 1280x800")
    check(d.depth in (16, 24, 32), "desktop.depth", "must be 16, 24 or 32")
    check(1 <= d.start_concurrency <= 256, "desktop.start_concurrency", "must be between 1 and 256")
    check(d.start_timeout_s > 0, "desktop.start_timeout_s", "must be positive")
    check(d.poll_interval_s > 0, "desktop.poll_interval_s", "must be positive")
    check(1024 <= d.max_cut_text <= 16 * 1024 * 1024, "desktop.max_cut_text", "must be 1024 to 16777216")
    check(d.workspace is None or "{account}" in d.workspace or "{user}" in d.workspace, "desktop.workspace",
          "must contain {account} or {user}")
    check(d.workspace is None or d.workspace.startswith(("/", "{state_dir}")), "desktop.workspace",
          "must be an absolute path")
    check(bool(_USER_PREFIX_RE.fullmatch(d.user_prefix)), "desktop.user_prefix",
          "use 1 to 16 of a-z 0-9 _ . - starting with a letter, e.g. wg-")
    check(16 <= d.limits.processes <= 65536, "desktop.limits.processes", "must be 16 to 65536")
    check(d.limits.memory_per_process is None or bool(_SLURM_MEM_RE.fullmatch(d.limits.memory_per_process)),
          "desktop.limits.memory_per_process", "use a size such as 4G or 512M")
    check(0 <= d.limits.nice <= 19, "desktop.limits.nice", "must be 0 to 19")
    check(d.limits.memory_per_desktop is None or bool(_SLURM_MEM_RE.fullmatch(d.limits.memory_per_desktop)
                                                      or _PERCENT_RE.fullmatch(d.limits.memory_per_desktop)),
          "desktop.limits.memory_per_desktop", "use a size such as 4G or 512M, or a share of the RAM such as 25%")
    check(1 <= d.limits.cpu_weight <= 10000, "desktop.limits.cpu_weight", "must be 1 to 10000")
    check(not d.keyboard_layout or bool(_LAYOUT_LIST_RE.fullmatch(d.keyboard_layout)),
          "desktop.keyboard_layout", "use an XKB layout name such as us, de or fr(azerty)")
    check(1 <= config.proxy.heartbeat_s <= 3600, "proxy.heartbeat_s", "must be 1 to 3600")
    check(config.proxy.shared_port == 0 or 1024 <= config.proxy.shared_port <= 65535, "proxy.shared_port",
          "must be 0 (any free port) or 1024 to 65535")
    check(1 <= config.proxy.max_viewers_per_account <= 64, "proxy.max_viewers_per_account", "must be 1 to 64")
    check(1 <= config.proxy.auth_timeout_s <= 600, "proxy.auth_timeout_s", "must be 1 to 600")
    check(not config.tls.terminated_by_proxy or (config.public_url or "").startswith("https://"),
          "tls.terminated_by_proxy", "needs public_url: the https:// URL of the proxy in front")
    check(config.apache.mode != "none" or config.proxy.mode == "builtin", "apache.mode",
          "none needs proxy.mode builtin (websockify listens on loopback only and needs Apache in front)")
    r = config.restart
    check(r.max_attempts >= 1, "restart.max_attempts", "must be at least 1")
    check(0 < r.backoff_initial_s <= r.backoff_max_s, "restart.backoff_initial_s",
          "must be positive and at most restart.backoff_max_s")
    check(r.window_s > 0, "restart.window_s", "must be positive")
    check(config.apache.tunnel_timeout_s >= 2, "apache.tunnel_timeout_s", "must be at least 2")
    # Apache cuts a tunnel after tunnel_timeout_s of silence: the pings must come more often.
    check(config.apache.mode == "none" or config.proxy.heartbeat_s < config.apache.tunnel_timeout_s,
          "proxy.heartbeat_s", "must be shorter than apache.tunnel_timeout_s, or Apache cuts idle tunnels")
    for key in ("user", "group"):
        check(bool(_UNIX_NAME_RE.fullmatch(getattr(config.apache, key))), f"apache.{key}",
              "must be a user or group name such as www-data")
    for key in ("binary", "modules_dir", "mime_types"):
        check(bool(getattr(config.apache, key).strip()), f"apache.{key}", "must not be empty")
    check((config.tls.cert is None) == (config.tls.key is None), "tls", "give both tls.cert and tls.key")
    for key in ("primary_color", "accent_color"):
        value = getattr(config.event, key)
        check(value is None or rgb(value) is not None, f"event.{key}",
              "use a colour such as #005a9c, #fc0 or a CSS colour name such as navy")
    try:
        parse_listen(config.listen)
    except ValueError as exc:
        check(False, "listen", str(exc))
    problems.extend(_slurm_checks(config, check))
    _ssh_checks(config.ssh, check)
    _dcv_checks(config.dcv, check)
    _participant_checks(config, check)
    _cockpit_checks(config, check)
    return problems


def config_warnings(config: Config, path: str, lines: Mapping[str, int]) -> list[Problem]:
    """What the organiser should know but that does not stop the gateway: theme colours below WCAG AA
    contrast, with the ratio and what the pages do instead, and remote desktops told to listen on every
    address (``gateway up`` logs them)."""
    event = config.event
    warnings = [Problem(path, lines.get(key, 0), f"{key}: {message}")
                for key, message in contrast_warnings(event.primary_color, event.accent_color)]
    for key, value, where in (("slurm.interface", config.slurm.interface, "node"),
                              ("ssh.interface", config.ssh.interface, "host")):
        if is_wildcard_address(value):
            warnings.append(Problem(path, lines.get(key, 0), (
                f"{key}: {value} makes each {where}'s desktops listen on every address of the {where}, reachable "
                f"from every network it is on with only the VNC password as a guard; use {AUTO_INTERFACE} "
                f"(the address the gateway connects to), or firewall the VNC ports so that only the gateway "
                f"host reaches them (README.md, Security model)")))
    return warnings


#: slurm.interface / ssh.interface: Xvnc listens only on the address the gateway connects to (worked out
#: where the desktop runs: gateway/backends/slurm_job.py, gateway/backends/ssh.py).
AUTO_INTERFACE = "auto"


def is_wildcard_address(value: str) -> bool:
    """Whether ``value`` is an IP address meaning "every address" (0.0.0.0, ::)."""
    try:
        return ipaddress.ip_address(value).is_unspecified
    except ValueError:
        return False


def is_interface(value: str) -> bool:
    """Whether ``value`` is a valid ``interface`` setting: auto, an IP address or a host name."""
    return value == AUTO_INTERFACE or (bool(_ADDRESS_RE.fullmatch(value)) and not value.startswith(("-", ".")))


_INTERFACE_HINT = f"use {AUTO_INTERFACE} (the address the gateway connects to), an IP address or a host name"


_SLURM_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SLURM_NODES_RE = re.compile(r"[A-Za-z0-9._\[\],-]{1,1024}")
_SLURM_TIME_RE = re.compile(r"now(\+[0-9]+(minutes|hours|days)?)?|[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2})?)?")
_SLURM_MEM_RE = re.compile(r"[1-9][0-9]*[KMGT]?")
_PERCENT_RE = re.compile(r"([1-9][0-9]?|100)%")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9.:-]{1,253}")


def _slurm_checks(config: Config, check: Check) -> list[Problem]:
    """The slurm: and container: blocks (their values reach Slurm command lines and job scripts)."""
    s = config.slurm
    for key in ("partition", "reservation", "account", "qos"):
        value = getattr(s, key)
        check(value is None or bool(_SLURM_NAME_RE.fullmatch(value)), f"slurm.{key}",
              "use 1-64 characters from A-Z a-z 0-9 . _ -")
    check(s.reservation_nodes is None or bool(_SLURM_NODES_RE.fullmatch(s.reservation_nodes)),
          "slurm.reservation_nodes", "use a Slurm node list such as node[01-04],gpu01")
    check(s.node_count >= 1, "slurm.node_count", "must be at least 1")
    check(bool(_SLURM_TIME_RE.fullmatch(s.event_start)), "slurm.event_start",
          "use now, now+2hours or a time such as 2026-11-23T09:00")
    check(s.event_duration_s >= 60, "slurm.event_duration_s", "must be at least 60")
    check(s.time_limit_s >= 60, "slurm.time_limit_s", "must be at least 60")
    check(s.cpus_per_desktop >= 1, "slurm.cpus_per_desktop", "must be at least 1")
    check(s.mem_per_desktop is None or bool(_SLURM_MEM_RE.fullmatch(s.mem_per_desktop)), "slurm.mem_per_desktop",
          "use a size such as 2G or 4096M")
    check(all(a.startswith("-") and "\n" not in a and "\0" not in a for a in s.extra_sbatch_args),
          "slurm.extra_sbatch_args", "give options, one per entry, e.g. [\"--gres=gpu:1\"]")
    check(bool(_SLURM_NAME_RE.fullmatch(s.job_name_prefix)), "slurm.job_name_prefix",
          "use 1-64 characters from A-Z a-z 0-9 . _ -")
    check(1 <= s.submit_concurrency <= 256, "slurm.submit_concurrency", "must be between 1 and 256")
    check(s.command_timeout_s > 0, "slurm.command_timeout_s", "must be positive")
    check(s.shared_dir is None or (s.shared_dir.startswith("/") and "\n" not in s.shared_dir),
          "slurm.shared_dir", "must be an absolute path")
    check(is_interface(s.interface), "slurm.interface", _INTERFACE_HINT)
    c = config.container
    check(c.runtime == "none" or bool(c.image), "container.runtime",
          f"{c.runtime} needs container.image (the path of the .sif image)")
    for bind in c.binds:
        try:
            validate_bind(bind)
        except ValueError as exc:
            check(False, "container.binds", str(exc))
    return []


_SSH_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,31}")


def _ssh_checks(s: SshConfig, check: Check) -> None:
    """The ssh: block (its values reach remote command lines, always quoted)."""
    check(s.user is None or s.user == "{account}" or bool(_SSH_USER_RE.fullmatch(s.user)), "ssh.user",
          'not a valid user name (or "{account}": each account logs in as the user named like it)')
    check(s.user != "{account}" or not s.state_dir.startswith(("/", "~")), "ssh.state_dir",
          'must be relative (in each user\'s home) when ssh.user is "{account}"')
    check(1 <= s.port <= 65535, "ssh.port", "must be 1 to 65535")
    check(s.connect_timeout_s > 0, "ssh.connect_timeout_s", "must be positive")
    check(1 <= s.connect_attempts <= 20, "ssh.connect_attempts", "must be 1 to 20")
    check(s.command_timeout_s > 0, "ssh.command_timeout_s", "must be positive")
    check(1 <= s.max_sessions_per_host <= 64, "ssh.max_sessions_per_host", "must be 1 to 64")
    check(is_interface(s.interface), "ssh.interface", _INTERFACE_HINT)
    check(bool(s.state_dir) and not any(c in s.state_dir for c in "\n\0"), "ssh.state_dir",
          "must be a path without newlines")
    for key in ("private_key", "known_hosts"):
        check(bool(getattr(s, key)), f"ssh.{key}", "must be a file path")


_DCV_GRES_RE = re.compile(r"[A-Za-z0-9_]{1,32}(:[A-Za-z0-9_.-]{1,64})?(:[0-9]{1,4})?")
_URL_PATH_RE = re.compile(r"/(?:[A-Za-z0-9._~{}-]+/)*")


def _dcv_checks(d: DcvConfig, check: Check) -> None:
    """The dcv: block (its values reach sbatch and the DCV job script, always quoted)."""
    check(bool(_SLURM_NAME_RE.fullmatch(d.partition)), "dcv.partition", "use 1-64 characters from A-Z a-z 0-9 . _ -")
    check(not d.gres or bool(_DCV_GRES_RE.fullmatch(d.gres)), "dcv.gres", "use a Slurm GRES such as gpu:1 or gpu:a100:1")
    check(1 <= d.port <= 65535, "dcv.port", "must be 1 to 65535")
    check(d.init_script is None or (d.init_script.startswith("/") and "\n" not in d.init_script),
          "dcv.init_script", "must be an absolute path")
    check(d.wait_s > 0, "dcv.wait_s", "must be positive")
    check(bool(d.dcv_path) and not any(c in d.dcv_path for c in "\n\0"), "dcv.dcv_path", "must be a command or a path")
    path_ok = bool(_URL_PATH_RE.fullmatch(d.web_url_path)) and d.web_url_path.replace("{account}", "").count("{") == 0 \
        and "}" not in d.web_url_path.replace("{account}", "")
    check(path_ok, "dcv.web_url_path", "use a path that starts and ends with /, e.g. /dcv/{account}/ or /")


def _participant_checks(config: Config, check: Check) -> None:
    """The registration: and archive: blocks."""
    r = config.registration
    check(r.event_code is None or 1 <= len(r.event_code) <= 200, "registration.event_code",
          "must be 1 to 200 characters")
    for key in ("signup_attempts", "signup_global_attempts", "signin_failures", "signin_failures_per_address"):
        check(getattr(r, key) >= 1, f"registration.{key}", "must be at least 1")
    for key in ("signup_window_s", "signup_global_window_s", "signin_window_s", "session_lifetime_s"):
        check(getattr(r, key) > 0, f"registration.{key}", "must be positive")
    a = config.archive
    check(1 <= a.concurrency <= 64, "archive.concurrency", "must be 1 to 64")
    check(1 <= a.compress_level <= 9, "archive.compress_level", "must be 1 to 9")
    _time_window_checks(check, "archive", a, ("available_from", "expires"), "2026-11-27T18:00:00+01:00")
    if a.notify is not None:

        try:
            parse_notify_url(a.notify)
        except ValueError as exc:
            check(False, "archive.notify", str(exc))
    for key in ("notify_credentials", "notify_ca_file"):
        value = getattr(a, key)
        check(value is None or value.startswith("/"), f"archive.{key}", "must be an absolute path")
    check(a.notify_from is None or bool(re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", a.notify_from)), "archive.notify_from",
          "must be an e-mail address such as desktops@example.org")


def _cockpit_checks(config: Config, check: Check) -> None:
    """The idle: and wall: blocks."""
    i = config.idle
    for key in ("after_minutes_without_viewers", "after_minutes_without_input"):
        value = getattr(i, key)
        check(value is None or value > 0, f"idle.{key}", "must be positive (or null: never)")
    check(i.warn_minutes_before >= 0, "idle.warn_minutes_before", "must be 0 or more")
    check(i.check_interval_s > 0, "idle.check_interval_s", "must be positive")
    check(all(0 < m <= 24 * 60 for m in i.end_warnings_minutes), "idle.end_warnings_minutes",
          "give minutes before the end, each more than 0 and at most 1440, e.g. [15, 5]")
    _time_window_checks(check, "idle", i, ("event_start", "event_end"), "2026-11-27T09:00:00+01:00")
    check((i.event_start is None) == (i.event_end is None), "idle.event_start", "give both event_start and event_end")
    w = config.wall
    match = _GEOMETRY_RE.fullmatch(w.thumbnail_size) or re.fullmatch(r"([1-9][0-9]{1,3})x([1-9][0-9]{1,3})",
                                                                       w.thumbnail_size)
    check(match is not None and int(match[1]) <= 1920 and int(match[2]) <= 1200, "wall.thumbnail_size",
          "use WIDTHxHEIGHT up to 1920x1200, e.g. 320x200")
    check(w.interval_s >= 0.5, "wall.interval_s", "must be at least 0.5")
    check(1 <= w.concurrency <= 64, "wall.concurrency", "must be 1 to 64")
    _viewer_checks(config, check)


def _time_window_checks(check: Check, block: str, section: object, keys: tuple[str, str], example: str) -> None:
    """Two optional ISO 8601 moments of a block (from, until): each must parse, and when both are
    given the first must come before the second."""
    moments = {}
    for key in keys:
        value = getattr(section, key)
        if value is not None:
            try:
                moments[key] = parse_moment(value)
            except ValueError:
                check(False, f"{block}.{key}", f"use an ISO 8601 time such as {example}")
    start, end = keys
    if len(moments) == 2:
        check(moments[start] < moments[end], f"{block}.{end}", f"must be later than {block}.{start}")


def _viewer_checks(config: Config, check: Check) -> None:
    """The viewer: and transfer: blocks."""
    for key in ("quality", "compression"):
        check(0 <= getattr(config.viewer, key) <= 9, f"viewer.{key}", "must be 0 to 9")
    t = config.transfer
    for key in ("upload_dir", "download_dir"):
        parts = getattr(t, key).split("/")
        check(bool(getattr(t, key)) and not getattr(t, key).startswith("/") and all(p not in ("", ".", "..") for p in parts),
              f"transfer.{key}", "use a folder inside the desktop's home, e.g. Uploads")
    check(t.max_file_mb > 0, "transfer.max_file_mb", "must be positive")
    check(t.quota_mb >= t.max_file_mb, "transfer.quota_mb", "must be at least transfer.max_file_mb")


def parse_moment(value: str) -> datetime.datetime:
    """An ISO 8601 time as an aware datetime (without a zone: this machine's local time)."""
    moment = datetime.datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.astimezone()


def is_loopback_host(host: str) -> bool:
    """True when ``host`` (a loopback address, or ``localhost``) reaches this machine only.

    Other names are not looked up (the model does no network I/O) and count as reachable from other
    machines: the safe side, since a public address then needs TLS.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def public_listen_problem(config: Config, listen: str) -> str | None:
    """Why participants would reach ``listen`` without TLS, with the fix; None when that is fine.

    Loopback needs nothing. Any other address needs tls.cert/tls.key on the gateway's own front
    (apache.mode private or none), or a proxy in front that terminates TLS, stated explicitly.
    """
    host, _ = parse_listen(listen)
    if is_loopback_host(host) or config.tls.terminated_by_proxy:
        return None
    if config.tls.enabled and config.apache.mode != "system":
        return None
    return (f"listen {listen} is reachable from other machines without TLS (passwords would cross the network "
            f"in clear): set tls.cert and tls.key, or tls.terminated_by_proxy: true with an https:// public_url "
            f"when a proxy in front terminates TLS, or listen on 127.0.0.1")


def public_signup_problem(config: Config, listen: str) -> str | None:
    """Why the sign-up form must not open without an event code (None: it may).

    The form is public when participants reach it from other machines: a listen address that is
    not loopback, or a public_url (a proxy in front). Then only the code announced in the room
    keeps strangers from taking every account.
    """
    r = config.registration
    if not r.enabled or r.event_code is not None:
        return None
    if config.public_url is None and is_loopback_host(parse_listen(listen)[0]):
        return None
    where = f"public_url {config.public_url}" if config.public_url else f"listen {listen}"
    return (f"registration.event_code: the sign-up form is public ({where}) and anyone who finds it could take "
            f"every account: set registration.event_code to a code announced in the room, or "
            f"registration.enabled: false")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into its parts; ValueError with a clear reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be 1-65535")
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise ValueError(f"{value!r}: not a host name or address")
    return host, int(port)


def parse_notify_url(url: str) -> tuple[str, int, bool]:
    """``smtp://host[:port]`` (STARTTLS when offered; port 25) or ``smtps://host[:port]`` (TLS; port 465)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname or parts.username or parts.password \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("use smtp://HOST:PORT or smtps://HOST:PORT (credentials go in archive.notify_credentials)")
    implicit = parts.scheme == "smtps"
    return parts.hostname, parts.port or (465 if implicit else 25), implicit
