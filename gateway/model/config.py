"""The gateway's YAML configuration: a frozen dataclass tree, validated with ``PATH:LINE:`` errors.

Every key has a default, so an empty or missing file is a valid configuration (the embedded
local default). Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import urllib.parse
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.model.errors import InputError, Problem

__all__ = [
    "Config",
    "DesktopConfig",
    "ProxyConfig",
    "ApacheConfig",
    "TlsConfig",
    "AdminConfig",
    "RestartConfig",
    "EventConfig",
    "DesktopLimits",
    "SlurmConfig",
    "ContainerConfig",
    "SshConfig",
    "DcvConfig",
    "RegistrationConfig",
    "ArchiveConfig",
    "IdleConfig",
    "WallConfig",
    "load_config",
    "parse_config",
    "PROJECT_ROOT",
    "default_state_dir",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: The gateway's own CSS, scripts and images, served by the web app and by Apache.
STATIC_DIR = PROJECT_ROOT / "web" / "static"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/workshop-gateway``, or ``~/.local/state/workshop-gateway``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "workshop-gateway"


@dataclass(frozen=True, slots=True)
class EventConfig:
    #: Shown as the title of the landing page and the viewer.
    title: str = "Workshop desktops"
    #: A short text for the landing page (plain text; paragraphs separated by blank lines).
    welcome: str = ""
    #: URL of a logo shown on every page.
    logo_url: str | None = None
    #: CSS colours for the event's look, e.g. "#005a9c".
    primary_color: str | None = None
    accent_color: str | None = None


@dataclass(frozen=True, slots=True)
class DesktopLimits:
    #: Processes and threads of one desktop's user (RLIMIT_NPROC counts per user: it caps a fork bomb).
    processes: int = 512
    #: Address space of each process of a desktop (RLIMIT_AS), e.g. "4G"; null: no limit. Browsers
    #: reserve far more address space than they use: set it only for desktops without one.
    memory_per_process: str | None = None
    #: Niceness of every desktop process: the gateway and its proxies stay responsive when a desktop
    #: spins the CPU.
    nice: int = 5


@dataclass(frozen=True, slots=True)
class DesktopConfig:
    #: Which Unix user each local desktop runs as: create (users made for the event, named
    #: user_prefix + account), existing (a user named like the account must exist), gateway (the
    #: gateway's own user: a single-user trial only, refused as root or on a public address).
    #: null: create when the gateway runs as root, else gateway.
    users: Literal["create", "existing", "gateway"] | None = None
    #: Created users are named PREFIX + the account in lower case (e.g. wg-ws01).
    user_prefix: str = "wg-"
    #: Resource limits of each desktop (see the README's Security model).
    limits: DesktopLimits = field(default_factory=DesktopLimits)
    #: Screen size of each desktop.
    geometry: str = "1280x800"
    #: Colour depth (16 or 24).
    depth: int = 24
    #: The session started inside each desktop (argv; DISPLAY and HOME are set).
    session: tuple[str, ...] = (str(PROJECT_ROOT / "containers" / "desktop-session"),)
    #: Each account's workspace (its HOME in the desktop); {account}, {user} and {state_dir} are
    #: replaced. null: /home/{user} for created users, the user's own home for existing users,
    #: {state_dir}/workspaces/{account} when desktops run as the gateway's user.
    workspace: str | None = None
    #: Keyboard layout applied in the session with setxkbmap (e.g. "de"); empty: the server's default.
    keyboard_layout: str = ""
    #: How many desktops start at the same time.
    start_concurrency: int = 8
    #: How long a desktop may take until its RFB handshake succeeds.
    start_timeout_s: float = 30.0
    #: How often each desktop is checked.
    poll_interval_s: float = 2.0
    #: Largest clipboard text accepted from a viewer, in bytes.
    max_cut_text: int = 262144


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    #: per-account: one websockify process per account (the design of the original setup);
    #: shared: one websockify for every account, each account's route carrying a secret token;
    #: builtin: the gateway's own web server relays each websocket to its desktop (no extra
    #: process; needed for apache.mode none).
    mode: Literal["per-account", "shared", "builtin"] = "per-account"
    #: websockify --heartbeat, or the builtin relay's ping interval: keeps idle tunnels open
    #: through Apache and NAT.
    heartbeat_s: int = 30
    #: shared mode: the loopback port of the shared websockify (0: any free port at start).
    shared_port: int = 0
    #: Tunnels open at once to one account (two tabs and an instructor watching); the next one is
    #: refused at once (by Apache's mod_qos in the websockify modes, by the relay in builtin mode).
    max_viewers_per_account: int = 4
    #: builtin mode: a websocket that has not finished VNC authentication by then is closed.
    auth_timeout_s: float = 20.0
    #: builtin mode: accept the permessage-deflate a browser offers (zlib level 1 on every frame).
    #: Off by default: VNC's Tight and ZRLE data is compressed already, so deflating it again
    #: costs relay CPU and saves few bytes (measured by bench/, README "Capacity").
    compression: bool = False


@dataclass(frozen=True, slots=True)
class RestartConfig:
    #: A process that dies is restarted at most this many times within window_s...
    max_attempts: int = 5
    window_s: float = 300.0
    #: ...after a jittered exponential delay between these bounds.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class TlsConfig:
    #: PEM certificate and key: the private Apache then serves HTTPS (wss:// for the desktops).
    cert: str | None = None
    key: str | None = None
    #: A proxy in front (a load balancer, the site's web server) terminates TLS: a public listen
    #: address is then accepted without cert/key, and public_url must be its https:// URL.
    terminated_by_proxy: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True, slots=True)
class ApacheConfig:
    #: private: the gateway runs its own Apache on `listen`; system: it writes an include file,
    #: reloads the site's Apache, and serves its pages on `listen` for that Apache to proxy.
    #: none: no Apache; the gateway serves pages and desktops on `listen` itself (https when
    #: tls.cert and tls.key are set); needs proxy.mode builtin.
    mode: Literal["private", "system", "none"] = "private"
    binary: str = "/usr/sbin/apache2"
    modules_dir: str = "/usr/lib/apache2/modules"
    mime_types: str = "/etc/mime.types"
    #: User and group of the private Apache's workers when the gateway runs as root.
    user: str = "www-data"
    group: str = "www-data"
    #: system mode: the include file written and the commands that test and reload the config.
    system_include: str = "/etc/apache2/conf-enabled/workshop-gateway.conf"
    configtest_command: tuple[str, ...] = ("apache2ctl", "configtest")
    reload_command: tuple[str, ...] = ("apache2ctl", "graceful")
    #: Longest silence on a desktop tunnel before Apache closes it (websockify heartbeats keep
    #: live tunnels busy anyway).
    tunnel_timeout_s: int = 86400


@dataclass(frozen=True, slots=True)
class SlurmConfig:
    """backend: slurm: one batch job per desktop, in an event reservation."""

    #: Partition the reservation and the jobs use (null: the cluster's default partition).
    partition: str | None = None
    #: Name of an existing reservation to submit into; null: the gateway creates one at `up` and
    #: deletes it at `down` (it never deletes a reservation it did not create).
    reservation: str | None = None
    #: The reservation the gateway creates: these nodes (a Slurm node list such as "node[01-04]")...
    reservation_nodes: str | None = None
    #: ...or, when reservation_nodes is null, this many nodes of the partition.
    node_count: int = 1
    #: When the event starts ("now", or a Slurm time such as 2026-11-23T09:00) and how long it lasts.
    event_start: str = "now"
    event_duration_s: float = 12 * 3600.0
    #: sbatch --account and --qos (null: the user's defaults).
    account: str | None = None
    qos: str | None = None
    #: Time limit of each desktop job (always passed as -t: a job without one never starts while a
    #: reservation covers its node).
    time_limit_s: int = 12 * 3600
    #: Resources of each desktop job: --cpus-per-task, and --mem such as "2G" (null: the
    #: partition's default memory; nodes must declare RealMemory for --mem to be accepted).
    cpus_per_desktop: int = 1
    mem_per_desktop: str | None = None
    #: More sbatch options, one per entry, e.g. ["--gres=gpu:1"] (passed as separate arguments).
    extra_sbatch_args: tuple[str, ...] = ()
    #: Jobs are named PREFIX-ACCOUNT.
    job_name_prefix: str = "desktop"
    #: How many sbatch commands run at the same time.
    submit_concurrency: int = 8
    #: Longest time any Slurm command (sbatch, squeue, scancel, scontrol) may take.
    command_timeout_s: float = 30.0
    #: A directory that the gateway host and every node see at the same path: each account gets a
    #: subdirectory with its job's output, its report (node, port, display) and its password secret
    #: (0600). null: {state_dir}/slurm, which works only when the nodes share the gateway's disk
    #: (e.g. the single-node test cluster).
    shared_dir: str | None = None
    #: account: each job runs as the OS user named like the account (submitted through runuser as
    #: root, or `sudo -n -u` otherwise; `gateway up` checks the users exist first), so a participant's
    #: terminal submits jobs as that user and reads only that account's secret. gateway: every job
    #: runs as the gateway's user, which can read every account's secret: never for strangers.
    run_as: Literal["gateway", "account"] = "account"
    #: Address Xvnc listens on in the job; the gateway host must reach it (0.0.0.0: all).
    interface: str = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class ContainerConfig:
    """The desktop container that Slurm jobs run Xvnc and the session in."""

    #: none: run Xvnc and the session directly on the node; singularity/apptainer: in `image`.
    runtime: Literal["none", "singularity", "apptainer"] = "none"
    #: Path of the .sif image on the nodes (required unless runtime is none).
    image: str | None = None
    #: Bind paths, "SRC[:DST[:ro|rw]]" each, e.g. ["/home", "/scratch", "/opt/modules:/opt/modules:ro"].
    binds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SshConfig:
    """backend: ssh: desktops on named VNC hosts that the gateway reaches over SSH (asyncssh)."""

    #: User the gateway logs in as on every VNC host (null: the user running the gateway), or
    #: "{account}": each account logs in as the user named like it (the organiser's key in each
    #: user's authorized_keys), so each desktop and its password file belong to that user.
    user: str | None = None
    #: Private key of that user (OpenSSH or PEM format, without a passphrase).
    private_key: str = "~/.ssh/id_ed25519"
    #: SSH port of the VNC hosts.
    port: int = 22
    #: The hosts' keys, in OpenSSH known_hosts format; a host that is missing, or shows another
    #: key, is refused (add keys after checking them, e.g. with ssh-keyscan).
    known_hosts: str = "~/.ssh/known_hosts"
    #: Longest wait for a connection (each attempt; an attempt is repeated with backoff).
    connect_timeout_s: float = 10.0
    connect_attempts: int = 3
    #: Longest time one remote command may take.
    command_timeout_s: float = 20.0
    #: Remote commands running at once over each host's single connection (sshd's MaxSessions,
    #: 10 by default, caps this).
    max_sessions_per_host: int = 8
    #: Xvnc and vncpasswd on the hosts.
    xvnc: str = "Xvnc"
    vncpasswd: str = "vncpasswd"
    #: Address each host's Xvnc listens on; the gateway connects to vnchost:vncport, so it must
    #: be reachable from the gateway (0.0.0.0: every address of the host).
    interface: str = "0.0.0.0"
    #: Password files, logs, pid files and workspaces on each host (relative: in the user's home).
    #: desktop.workspace is applied with {state_dir} meaning this directory.
    state_dir: str = "workshop-gateway"
    #: The session started on the host (argv; DISPLAY and HOME are set); null: desktop.session,
    #: which must then exist at the same path on the host.
    session: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class DcvConfig:
    """NICE DCV sessions on GPU nodes (see gateway/backends/dcv.py), with a VNC desktop as the fallback.

    DCV accounts run as Slurm jobs (the slurm: block's reservation, time limit, job names, shared dir
    and run_as apply); the browser reaches a session at /dcv/ACCOUNT/ after signing in to the gateway.
    """

    #: Protocol of accounts whose token line has no protocol= field: vnc, dcv, or auto (dcv for
    #: gpu=yes accounts, vnc for the others).
    default_protocol: Literal["vnc", "dcv", "auto"] = "vnc"
    #: The Slurm partition of the GPU nodes that run DCV.
    partition: str = "gpu"
    #: --gres of each DCV job (e.g. "gpu:1"; empty: none).
    gres: str = "gpu:1"
    #: Submit DCV jobs into the event reservation (turn off when it does not cover the GPU nodes).
    use_reservation: bool = True
    #: Port of the DCV server on the GPU nodes (its web server and the native client's port).
    port: int = 8443
    #: How the gateway talks to that web server: https (DCV's default; its certificate is not
    #: checked, as DCV makes a self-signed one on each node) or http.
    scheme: Literal["https", "http"] = "https"
    #: dcv create-session --type: virtual (an X server per session) or console (the node's display).
    session_type: Literal["virtual", "console"] = "virtual"
    #: dcv create-session --init: script that starts the session's desktop (null: DCV's default).
    init_script: str | None = None
    #: How long a DCV session may take (queueing for a GPU included) before the account gets a
    #: VNC desktop instead.
    wait_s: float = 120.0
    #: The dcv command on the GPU nodes.
    dcv_path: str = "dcv"
    #: The DCV server's web-url-path for an account's session ({account} is replaced); the gateway
    #: forwards /dcv/ACCOUNT/... to NODE:PORT followed by this path.
    web_url_path: str = "/dcv/{account}/"


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    """The participants' sign-up form (/signup) and sign-in (/login, /me); see gateway/web/participant.py."""

    #: Offer the sign-up form: it hands the next free account of the token file to each e-mail.
    #: (Sign-in with account id and password, and the personal page, work either way.)
    enabled: bool = False
    #: Terms to accept before signing up: Markdown files (relative: to this config file), each
    #: shown on the form with a checkbox; its first "# heading" is its title.
    documents: tuple[str, ...] = ()
    #: A code announced at the event that the form asks for (null: no code).
    event_code: str | None = None
    #: The same e-mail signing up again is only told that it has an account: a password is shown
    #: once, in the answer to the sign-up that claimed it (organisers look accounts up with
    #: `gateway accounts list`). "show" was removed: anyone who knew an e-mail could read its password.
    repeat: Literal["hide"] = "hide"
    #: Sign-up requests accepted from one client address within signup_window_s.
    signup_attempts: int = 30
    signup_window_s: float = 600.0
    #: Sign-up requests accepted from all addresses together within signup_global_window_s.
    signup_global_attempts: int = 120
    signup_global_window_s: float = 60.0
    #: Failed sign-ins accepted from one client address within signin_window_s.
    signin_failures: int = 10
    signin_window_s: float = 300.0
    #: How long a sign-in lasts.
    session_lifetime_s: float = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """Post-event archives of each workspace (`gateway archive`) and their download (/archive/ACCOUNT)."""

    #: Let participants download their archive from their page or with `curl -u ACCOUNT`.
    enabled: bool = False
    #: Format `gateway archive` writes unless --format says otherwise.
    format: Literal["tar.gz", "zip"] = "tar.gz"
    #: Archives packed at the same time, and the compression level (1 fast ... 9 small).
    concurrency: int = 4
    compress_level: int = 6
    #: Downloads are offered from this time until that one: ISO 8601 such as
    #: "2026-11-27T18:00:00+01:00" (without a zone: the gateway's local time); null: no limit.
    available_from: str | None = None
    expires: str | None = None
    #: E-mail participants who signed up when their archive is packed: smtp://HOST:PORT (STARTTLS when
    #: offered) or smtps://HOST:PORT; null: no e-mail. The message links to their page, never a password.
    notify: str | None = None
    #: A 0600 file with the SMTP user name and password on two lines (sent only over TLS); null: none.
    notify_credentials: str | None = None
    #: The sender address (null: workshop-gateway@ this host's name).
    notify_from: str | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    #: User name of the admin page and /metrics (HTTP Basic). Participants' accounts never work there.
    user: str = "admin"
    #: File holding the admin password; default {state_dir}/secrets/admin.password, made (0600)
    #: with a random password at the first start.
    password_file: str | None = None


@dataclass(frozen=True, slots=True)
class IdleConfig:
    """What happens to desktops nobody uses (see gateway/supervisor/idle.py). Minutes may be fractional."""

    #: A desktop is idle after this many minutes without a connected viewer (null: never for this).
    after_minutes_without_viewers: float | None = None
    #: ...or after this many minutes without keyboard or mouse input (null: never for this; only
    #: proxy.mode builtin sees input, other modes ignore this).
    after_minutes_without_input: float | None = None
    #: The participant is warned inside the desktop this many minutes before the action.
    warn_minutes_before: float = 5.0
    #: What is done to an idle desktop outside the event window (or always, without a window).
    action: Literal["none", "disconnect", "stop"] = "none"
    #: The event window (ISO 8601, like archive.available_from); inside it event_action applies.
    event_start: str | None = None
    event_end: str | None = None
    event_action: Literal["none", "disconnect", "stop"] = "none"
    #: How often desktops are checked.
    check_interval_s: float = 30.0
    #: Warnings inside each desktop this many minutes before its end: a Slurm job's time limit, or
    #: event_end (each extended by `gateway extend`); [] for none.
    end_warnings_minutes: tuple[float, ...] = (15.0, 5.0)


@dataclass(frozen=True, slots=True)
class WallConfig:
    """The admin page's wall of live thumbnails (/admin/wall; see gateway/web/thumbnails.py)."""

    #: Size of each thumbnail (the desktop is scaled to fit and padded).
    thumbnail_size: str = "320x200"
    #: How often each desktop is grabbed while the wall is open.
    interval_s: float = 5.0
    #: Desktops grabbed at the same time.
    concurrency: int = 8


@dataclass(frozen=True, slots=True)
class ViewerConfig:
    """The event's viewer defaults; a participant's own choice (kept in their browser) still wins."""

    #: noVNC's JPEG quality, 0 (small, blurry) to 9 (sharp, about 3x the bytes of 6 on photos).
    quality: int = 6
    #: zlib level, 0 to 9: higher saves bandwidth on slow Wi-Fi at some CPU cost on both ends.
    compression: int = 2


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """Files in and out of local desktops from the viewer (see gateway/web/transfer.py)."""

    #: Offer the Upload button and the Downloads panel (local desktops only).
    enabled: bool = True
    #: Uploads land in this folder of the desktop's home (made when missing).
    upload_dir: str = "Uploads"
    #: The Downloads panel lists and serves this folder of the desktop's home.
    download_dir: str = "Downloads"
    #: Largest file accepted, and all uploads of one account together (the home's files are not counted).
    max_file_mb: float = 100.0
    quota_mb: float = 500.0


@dataclass(frozen=True, slots=True)
class Config:
    #: Where desktops run: local (Xvnc on this machine), slurm (a batch job per desktop) or ssh
    #: (Xvnc started over SSH on each token line's vnchost; see ssh:).
    backend: Literal["local", "slurm", "ssh"] = "local"
    #: Address the private Apache listens on (--listen wins).
    listen: str = "127.0.0.1:8080"
    #: Holds state, logs, password files and workspaces (--state-dir wins).
    state_dir: str | None = None
    #: URL participants use, printed at start (default: from listen).
    public_url: str | None = None
    #: Directory with noVNC's core/ and vendor/ (default: web/node_modules/@novnc/novnc,
    #: then Debian's /usr/share/novnc).
    novnc_path: str | None = None
    event: EventConfig = field(default_factory=EventConfig)
    desktop: DesktopConfig = field(default_factory=DesktopConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    apache: ApacheConfig = field(default_factory=ApacheConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    container: ContainerConfig = field(default_factory=ContainerConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    dcv: DcvConfig = field(default_factory=DcvConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    wall: WallConfig = field(default_factory=WallConfig)
    viewer: ViewerConfig = field(default_factory=ViewerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    #: Where the file came from, for messages.
    source: str = "<defaults>"


# -- loading -------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a YAML config; None gives the defaults."""
    if path is None:
        return Config()
    shown = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError([Problem(shown, 0, f"cannot read config: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise InputError([Problem(shown, 0, "config is not valid UTF-8 text")]) from None
    return parse_config(text, shown)


def parse_config(text: str, path: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError([Problem(path, line, f"invalid YAML: {reason}")]) from None
    problems: list[Problem] = []
    if node is None:
        return Config(source=path)
    reader = _Reader(path, problems)
    values = reader.dataclass_values(Config, node, "")
    if problems:
        raise InputError(problems)
    config = Config(**values, source=path)
    problems.extend(_semantic_checks(config, path, reader.lines))
    if problems:
        raise InputError(problems)
    return config


class _Reader:
    """Turns a composed YAML node tree into constructor arguments, following the dataclass fields.

    Only fields declared on the dataclasses are read; anything else is reported, never set.
    """

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        self.lines: dict[str, int] = {}

    def bad(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(self.path, node.start_mark.line + 1, message))

    def dataclass_values(self, cls: type, node: yaml.Node, prefix: str) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            self.bad(node, f"{prefix or 'config'} must be a mapping of keys to values")
            return {}
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            dotted = f"{prefix}{key}"
            if key not in known:
                self.bad(key_node, f"unknown key {dotted!r} (known: {', '.join(sorted(known))})")
                continue
            if key in values:
                self.bad(key_node, f"{dotted} is given twice")
                continue
            self.lines[dotted] = key_node.start_mark.line + 1
            value = self.value(hints[key], value_node, dotted)
            if value is not _INVALID:
                values[key] = value
        return values

    def value(self, hint: Any, node: yaml.Node, dotted: str) -> Any:
        if dataclasses.is_dataclass(hint):
            return hint(**self.dataclass_values(hint, node, dotted + "."))
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if _is_null(node) and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.value(inner, node, dotted)
        if origin is Literal:
            raw = self.scalar(node, dotted)
            if raw is _INVALID or raw not in args:
                self.bad(node, f"{dotted} must be one of: {', '.join(map(str, args))}")
                return _INVALID
            return raw
        if origin is tuple:
            return self.string_list(node, dotted, float if args and args[0] is float else str)
        return self.typed_scalar(hint, node, dotted)

    def scalar(self, node: yaml.Node, dotted: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.bad(node, f"{dotted} must be a single value")
            return _INVALID
        try:
            value = yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:  # e.g. a !!python/object tag
            self.bad(node, f"{dotted}: {exc.problem or 'not a plain value'}")
            return _INVALID
        control = _TEXT_CONTROL_RE if dotted in _MULTILINE_KEYS else _CONTROL_RE
        if isinstance(value, str) and control.search(value):
            # A newline in a value would start a new directive in the Apache config, the unit file
            # or a job script; no setting needs one.
            self.bad(node, f"{dotted} must be one line without control characters")
            return _INVALID
        return value

    def typed_scalar(self, hint: type, node: yaml.Node, dotted: str) -> Any:
        raw = self.scalar(node, dotted)
        if raw is _INVALID:
            return _INVALID
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if hint is str and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = str(raw)
        if hint is str and isinstance(raw, datetime.date):  # an unquoted YAML timestamp
            raw = raw.isoformat()
        if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
            self.bad(node, f"{dotted} must be {_TYPE_WORDS.get(hint, hint.__name__)}, not {raw!r}")
            return _INVALID
        return raw

    def string_list(self, node: yaml.Node, dotted: str, item_type: type = str) -> Any:
        if isinstance(node, yaml.ScalarNode):
            example = "[15, 5]" if item_type is float else "[program, --option]"
            self.bad(node, f"{dotted} must be a list, e.g. {example}")
            return _INVALID
        if not isinstance(node, yaml.SequenceNode):
            self.bad(node, f"{dotted} must be a list of strings")
            return _INVALID
        items = [self.typed_scalar(item_type, item, dotted) for item in node.value]
        return _INVALID if _INVALID in items else tuple(items)


_INVALID = object()
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: Settings that are text for people, where line breaks (and tabs) are meant.
_MULTILINE_KEYS = frozenset({"event.welcome"})
_TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


_UNIX_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_USER_PREFIX_RE = re.compile(r"[a-z][a-z0-9_.-]{0,15}")
_GEOMETRY_RE = re.compile(r"([1-9][0-9]{2,4})x([1-9][0-9]{2,4})")
_COLOR_RE = re.compile(r"#[0-9A-Fa-f]{3}(?:[0-9A-Fa-f]{3})?|[a-z]{3,20}")
_LAYOUT_RE = re.compile(r"[a-z]{2,8}(?:\([A-Za-z0-9_-]+\))?(?:,[a-z]{2,8}(?:\([A-Za-z0-9_-]+\))?)*")


def _semantic_checks(config: Config, path: str, lines: Mapping[str, int]) -> list[Problem]:
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
    check(not d.keyboard_layout or bool(_LAYOUT_RE.fullmatch(d.keyboard_layout)),
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
        check(value is None or bool(_COLOR_RE.fullmatch(value)), f"event.{key}",
              "use a CSS colour like #005a9c or a colour name")
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


_SLURM_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SLURM_NODES_RE = re.compile(r"[A-Za-z0-9._\[\],-]{1,1024}")
_SLURM_TIME_RE = re.compile(r"now(\+[0-9]+(minutes|hours|days)?)?|[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2})?)?")
_SLURM_MEM_RE = re.compile(r"[1-9][0-9]*[KMGT]?")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9.:-]{1,253}")


def _slurm_checks(config: Config, check) -> list[Problem]:
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
    check(bool(_ADDRESS_RE.fullmatch(s.interface)), "slurm.interface", "must be an IP address or host name")
    c = config.container
    check(c.runtime == "none" or bool(c.image), "container.runtime",
          f"{c.runtime} needs container.image (the path of the .sif image)")
    for bind in c.binds:
        try:
            _validate_bind(bind)
        except ValueError as exc:
            check(False, "container.binds", str(exc))
    return []


def _validate_bind(bind: str) -> None:
    from gateway.model.container import validate_bind

    validate_bind(bind)


_SSH_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,31}")


def _ssh_checks(s: SshConfig, check) -> None:
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
    check(bool(_ADDRESS_RE.fullmatch(s.interface)), "ssh.interface", "must be an IP address or host name")
    check(bool(s.state_dir) and not any(c in s.state_dir for c in "\n\0"), "ssh.state_dir",
          "must be a path without newlines")
    for key in ("private_key", "known_hosts"):
        check(bool(getattr(s, key)), f"ssh.{key}", "must be a file path")


_DCV_GRES_RE = re.compile(r"[A-Za-z0-9_]{1,32}(:[A-Za-z0-9_.-]{1,64})?(:[0-9]{1,4})?")
_URL_PATH_RE = re.compile(r"/(?:[A-Za-z0-9._~{}-]+/)*")


def _dcv_checks(d: DcvConfig, check) -> None:
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


def _participant_checks(config: Config, check) -> None:
    """The registration: and archive: blocks."""
    r = config.registration
    check(r.event_code is None or 1 <= len(r.event_code) <= 200, "registration.event_code",
          "must be 1 to 200 characters")
    for key in ("signup_attempts", "signup_global_attempts", "signin_failures"):
        check(getattr(r, key) >= 1, f"registration.{key}", "must be at least 1")
    for key in ("signup_window_s", "signup_global_window_s", "signin_window_s", "session_lifetime_s"):
        check(getattr(r, key) > 0, f"registration.{key}", "must be positive")
    a = config.archive
    check(1 <= a.concurrency <= 64, "archive.concurrency", "must be 1 to 64")
    check(1 <= a.compress_level <= 9, "archive.compress_level", "must be 1 to 9")
    moments = {}
    for key in ("available_from", "expires"):
        value = getattr(a, key)
        if value is not None:
            try:
                moments[key] = parse_moment(value)
            except ValueError:
                check(False, f"archive.{key}", "use an ISO 8601 time such as 2026-11-27T18:00:00+01:00")
    if len(moments) == 2:
        check(moments["available_from"] < moments["expires"], "archive.expires",
              "must be later than archive.available_from")
    if a.notify is not None:

        try:
            parse_notify_url(a.notify)
        except ValueError as exc:
            check(False, "archive.notify", str(exc))
    check(a.notify_credentials is None or a.notify_credentials.startswith("/"), "archive.notify_credentials",
          "must be an absolute path")
    check(a.notify_from is None or bool(re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", a.notify_from)), "archive.notify_from",
          "must be an e-mail address such as desktops@example.org")


def _cockpit_checks(config: Config, check) -> None:
    """The idle: and wall: blocks."""
    i = config.idle
    for key in ("after_minutes_without_viewers", "after_minutes_without_input"):
        value = getattr(i, key)
        check(value is None or value > 0, f"idle.{key}", "must be positive (or null: never)")
    check(i.warn_minutes_before >= 0, "idle.warn_minutes_before", "must be 0 or more")
    check(i.check_interval_s > 0, "idle.check_interval_s", "must be positive")
    check(all(0 < m <= 24 * 60 for m in i.end_warnings_minutes), "idle.end_warnings_minutes",
          "give minutes before the end, each more than 0 and at most 1440, e.g. [15, 5]")
    moments = {}
    for key in ("event_start", "event_end"):
        value = getattr(i, key)
        if value is not None:
            try:
                moments[key] = parse_moment(value)
            except ValueError:
                check(False, f"idle.{key}", "use an ISO 8601 time such as 2026-11-27T09:00:00+01:00")
    check((i.event_start is None) == (i.event_end is None), "idle.event_start", "give both event_start and event_end")
    if len(moments) == 2:
        check(moments["event_start"] < moments["event_end"], "idle.event_end", "must be later than idle.event_start")
    w = config.wall
    match = _GEOMETRY_RE.fullmatch(w.thumbnail_size) or re.fullmatch(r"([1-9][0-9]{1,3})x([1-9][0-9]{1,3})",
                                                                       w.thumbnail_size)
    check(match is not None and int(match[1]) <= 1920 and int(match[2]) <= 1200, "wall.thumbnail_size",
          "use WIDTHxHEIGHT up to 1920x1200, e.g. 320x200")
    check(w.interval_s >= 0.5, "wall.interval_s", "must be at least 0.5")
    check(1 <= w.concurrency <= 64, "wall.concurrency", "must be 1 to 64")
    _viewer_checks(config, check)


def _viewer_checks(config: Config, check) -> None:
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
    """True when ``host`` (an address or a name) reaches this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # unknown: assume other machines can reach it
    return bool(found) and all(ipaddress.ip_address(f[4][0]).is_loopback for f in found)


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
