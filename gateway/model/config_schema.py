"""The gateway's configuration as data: a frozen dataclass tree, one class per YAML block.

Every key has a default, so ``Config()`` is the embedded local default. The comments starting with
``#:`` are the documentation of each key. Reading YAML into these classes is
:mod:`gateway.model.config`; the rules between values are :mod:`gateway.model.config_checks`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "Config",
    "EventConfig",
    "DesktopLimits",
    "DesktopConfig",
    "ProxyConfig",
    "RestartConfig",
    "TlsConfig",
    "ApacheConfig",
    "SlurmConfig",
    "ContainerConfig",
    "SshConfig",
    "DcvConfig",
    "RegistrationConfig",
    "ArchiveConfig",
    "AdminConfig",
    "IdleConfig",
    "WallConfig",
    "ViewerConfig",
    "TransferConfig",
    "PROJECT_ROOT",
    "STATIC_DIR",
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
    #: Colours of the event's look (#rgb, #rrggbb or a CSS colour name), checked for WCAG AA contrast.
    primary_color: str | None = None
    accent_color: str | None = None


@dataclass(frozen=True, slots=True)
class DesktopLimits:
    """What one local desktop may use. Where systemd runs the machine, each desktop's X server and
    session start in cgroup scopes of their own (``systemd-run --scope``) that enforce ``processes``,
    ``memory_per_desktop`` and ``cpu_weight``; the per-user rlimits and ``nice`` apply everywhere."""

    #: Processes and threads of one desktop's user (RLIMIT_NPROC counts per user: it caps a fork bomb);
    #: with cgroup scopes also the TasksMax of each scope.
    processes: int = 512
    #: Memory of each of a desktop's cgroup scopes (MemoryMax: its X server's, and its session's with
    #: every program started in it), e.g. "4G", or a share of the machine's RAM such as "25%"; null: no
    #: limit. Needs cgroup scopes (systemd); elsewhere only memory_per_process limits memory.
    memory_per_desktop: str | None = "25%"
    #: CPU weight of each desktop's cgroup scopes (CPUWeight, 1 to 10000) against systemd's default of
    #: 100 for the gateway's service and other services: under full load, desktops share the CPU
    #: evenly and the gateway and its proxies keep a share of their own. Needs cgroup scopes.
    cpu_weight: int = 20
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
    #: through Apache and NAT, and finds tunnels whose viewer vanished in a network cut (the ping
    #: meets the viewer computer's reset) before they fill max_viewers_per_account.
    heartbeat_s: int = 5
    #: shared mode: the loopback port of the shared websockify (0: any free port at start).
    shared_port: int = 0
    #: Tunnels open at once to one account (two tabs and an instructor watching); the next one is
    #: refused at once (by Apache's mod_qos in the websockify modes, by the relay in builtin mode).
    max_viewers_per_account: int = 4
    #: builtin and per-account modes: a websocket that has not finished VNC authentication by then is closed.
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
    #: Address Xvnc listens on in the job. auto: the node's own address in Slurm (its NodeAddr, which
    #: the gateway connects to), resolved on the node; a job that can't tell it fails and says why.
    #: Or an address of the nodes; 0.0.0.0 (every address of the node) draws a warning at startup.
    interface: str = "auto"


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
    #: Address each host's Xvnc listens on. auto: the host address the gateway's SSH connection
    #: arrived at (from $SSH_CONNECTION), which is where it connects to vnchost:vncport too. Or an
    #: address of the hosts; 0.0.0.0 (every address of the host) draws a warning at startup.
    interface: str = "auto"
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
    #: Failed sign-up submissions (a wrong event code, a field refused) accepted from one client
    #: address within signup_window_s. Only failures count: a whole room behind one NAT signs up
    #: from one address, and the global rate below bounds the sign-ups themselves.
    signup_attempts: int = 30
    signup_window_s: float = 600.0
    #: Sign-up requests accepted from all addresses together within signup_global_window_s.
    signup_global_attempts: int = 120
    signup_global_window_s: float = 60.0
    #: Failed sign-ins accepted for one account from one client address within signin_window_s
    #: (per account: one participant's typos must not lock out a room that shares one address).
    signin_failures: int = 10
    #: Failed sign-ins accepted from one client address for all accounts together (guessing across accounts).
    signin_failures_per_address: int = 100
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
    #: PEM file of the CA that signed the mail server's certificate (a private mail server); only that
    #: CA is trusted then. null: the system's CAs.
    notify_ca_file: str | None = None
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
    #: What is worth knowing but not wrong (theme colours below WCAG AA): ``PATH:LINE: key: message``.
    warnings: tuple[str, ...] = ()
