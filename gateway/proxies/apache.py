"""The Apache front: generated rules, Apache's own syntax check, and a private or system instance."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.common.files import atomic_write
from gateway.common.frontdoor import FRONT_HEADER, FRONT_TOKEN, ReadTimeouts
from gateway.common.proc import ProcessIdentity, run, spawn_listening, terminate_group
from gateway.common.render import render
from gateway.model.config import PROJECT_ROOT, STATIC_DIR, Config, parse_listen
from gateway.model.errors import UserError
from gateway.proxies.base import Route, reported_as_start_error

__all__ = ["ApacheLayout", "MpmSizing", "render_apache_config", "configtest", "PrivateApache",
           "install_system_rules", "novnc_dir", "STATIC_DIR"]

log = logging.getLogger("gateway.apache")

NOVNC_CANDIDATES = (PROJECT_ROOT / "web" / "node_modules" / "@novnc" / "novnc", Path("/usr/share/novnc"))

THREADS_PER_CHILD = 64
DEBIAN_DEFAULT_WORKERS = 150
TUNNEL_HEADROOM = 64


@dataclass(frozen=True, slots=True)
class MpmSizing:
    tunnels: int
    threads_per_child: int
    server_limit: int
    max_request_workers: int
    viewers_per_account: int

    @classmethod
    def for_accounts(cls, accounts: int, viewers_per_account: int) -> "MpmSizing":
        # Every tunnel holds a worker: as many as each account may open (proxy.max_viewers_per_account;
        # Apache or the relay refuses the next), plus headroom for pages and static files. Fewer
        # would let one laptop holding its share of tunnels on every account starve the landing page.
        tunnels = viewers_per_account * accounts + TUNNEL_HEADROOM
        server_limit = math.ceil(max(tunnels, DEBIAN_DEFAULT_WORKERS) / THREADS_PER_CHILD)
        return cls(tunnels, THREADS_PER_CHILD, server_limit, server_limit * THREADS_PER_CHILD, viewers_per_account)


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    path: str


@dataclass(frozen=True, slots=True)
class ApacheLayout:
    """Where a private Apache keeps its files, all inside the gateway's state dir."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "httpd.conf"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "httpd.pid"

    @property
    def error_log(self) -> Path:
        return self.root / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        return self.root / "logs" / "access.log"


_MODULES = ("mpm_event", "authz_core", "mime", "alias", "headers", "proxy", "proxy_http", "proxy_wstunnel",
            "reqtimeout")
_TLS_MODULES = ("socache_shmcb", "ssl")
#: mod_qos caps the tunnels per account in the websockify modes (Debian: libapache2-mod-qos).
_QOS_MODULES = ("unique_id", "qos")
#: Debian 12's mod_qos was built against PCRE 1, which this Apache (PCRE 2) no longer loads itself.
_PCRE1_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libpcre.so.3", "/usr/lib/aarch64-linux-gnu/libpcre.so.3",
                     "/usr/lib/libpcre.so.3", "/lib/x86_64-linux-gnu/libpcre.so.3")


def qos_module_path(config: Config) -> str:
    return os.path.join(config.apache.modules_dir, "mod_qos.so")


def needs_qos(config: Config) -> bool:
    """The websockify modes need Apache to cap each account's tunnels (builtin mode: the relay does)."""
    return config.proxy.mode != "builtin"


def _modules(config: Config) -> list[Module]:
    names = _MODULES + (_TLS_MODULES if config.tls.enabled else ())
    if needs_qos(config) and os.path.exists(qos_module_path(config)):
        names += _QOS_MODULES
    return [Module(f"{n}_module", os.path.join(config.apache.modules_dir, f"mod_{n}.so")) for n in names]


def _load_files(modules: Sequence[Module]) -> list[str]:
    if not any(m.name == "qos_module" for m in modules):
        return []
    return [p for p in _PCRE1_CANDIDATES if os.path.exists(p)][:1]


def novnc_dir(config: Config) -> Path:
    """The noVNC package to serve: configured, else npm's pinned copy, else Debian's."""
    candidates = (Path(config.novnc_path),) if config.novnc_path else NOVNC_CANDIDATES
    for candidate in candidates:
        if (candidate / "core" / "rfb.js").is_file():
            return candidate
    wanted = " or ".join(str(c) for c in candidates)
    raise UserError(f"noVNC not found (looked for core/rfb.js in {wanted}); "
                    f"run `npm ci` in web/ or install Debian's novnc package")


def render_apache_config(
    config: Config,
    routes: Sequence[Route],
    *,
    web_port: int,
    layout: ApacheLayout | None,
    listen: str,
) -> str:
    """The Apache configuration: a whole server for ``layout`` (private), or only the rules."""
    # Longer paths first, so that no account's path can shadow another's deeper one.
    ordered = sorted(routes, key=lambda r: (-r.path.count("/"), r.path))
    context: dict[str, object] = {
        "routes": ordered,
        "proxy_mode": config.proxy.mode,
        "prefix": "",
        "web_port": web_port,
        "tunnel_timeout_s": config.apache.tunnel_timeout_s,
        "static_dir": f"{STATIC_DIR}/",
        "novnc_dir": f"{novnc_dir(config)}/",
        "private": layout is not None,
        "viewer_limit": config.proxy.max_viewers_per_account if needs_qos(config) else None,
        "front_header": FRONT_HEADER,
        "front_token": FRONT_TOKEN,
    }
    if layout is not None:
        host, port = parse_listen(listen)
        running_as_root = os.geteuid() == 0
        context.update(
            server_root=str(layout.root),
            runtime_dir=str(layout.runtime_dir),
            pid_file=str(layout.pid_file),
            error_log=str(layout.error_log),
            access_log=str(layout.access_log),
            listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            server_name=host if ":" not in host else "localhost",
            run_user=config.apache.user if running_as_root else "",
            run_group=config.apache.group if running_as_root else "",
            modules=(modules := _modules(config)),
            load_files=_load_files(modules),
            reqtimeout=ReadTimeouts(),
            mime_types=config.apache.mime_types,
            mpm=MpmSizing.for_accounts(len(routes), config.proxy.max_viewers_per_account),
            tls=config.tls if config.tls.enabled else None,
        )
    return render("apache.conf.j2", **context)


async def configtest(binary: str, config_file: Path) -> None:
    """Apache's own syntax check of the whole file; UserError with Apache's words if it fails."""
    result = await run([binary, "-t", "-f", str(config_file)], timeout_s=30)
    if not result.ok:
        message = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        detail = message[0] if message else f"status {result.returncode}"
        raise UserError(f"{config_file}: Apache rejected the generated configuration: {detail}")


class PrivateApache:
    """The gateway's own Apache: config, logs and pid file in the state dir; runs in the foreground."""

    def __init__(self, config: Config, layout: ApacheLayout) -> None:
        self.config = config
        self.layout = layout
        self.process: asyncio.subprocess.Process | None = None
        self.identity: ProcessIdentity | None = None

    async def write_config(self, text: str) -> None:
        for directory in (self.layout.root, self.layout.runtime_dir, self.layout.error_log.parent):
            directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.layout.config_file, text, mode=0o644)
        await configtest(self.config.apache.binary, self.layout.config_file)

    async def start(self, listen: str) -> tuple[asyncio.subprocess.Process, ProcessIdentity]:
        self.layout.pid_file.unlink(missing_ok=True)
        argv = [self.config.apache.binary, "-f", str(self.layout.config_file), "-DFOREGROUND"]
        host, port = parse_listen(listen)
        with reported_as_start_error():
            proc, identity = await spawn_listening(argv, host=host, port=port, timeout_s=20,
                                                   log_path=self.layout.root / "logs" / "stderr.log")
        self.process, self.identity = proc, identity
        log.info("apache started listen=%s pid=%d", listen, proc.pid)
        return proc, identity

    async def stop(self) -> None:
        if self.identity is not None:
            # Apache's "graceful-stop" is SIGWINCH; TERM stops at once, which is what shutdown wants.
            await terminate_group(self.identity, proc=self.process, grace_s=5)
            self.process = self.identity = None


async def install_system_rules(config: Config, text: str) -> None:
    """System mode: write the include file, let the site's Apache check it, reload gracefully.

    If the check fails the previous include file is put back, so the site keeps working.
    """
    include = Path(config.apache.system_include)
    previous = include.read_bytes() if include.exists() else None
    atomic_write(include, text, mode=0o600)  # it holds the front door's secret; Apache reads it as root
    result = await run(config.apache.configtest_command, timeout_s=30)
    if not result.ok:
        if previous is None:
            include.unlink()
        else:
            atomic_write(include, previous, mode=0o600)
        detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        raise UserError(f"{include}: the site's Apache rejected the gateway rules: "
                        f"{detail[0] if detail else result.returncode}")
    (await run(config.apache.reload_command, timeout_s=30)).check()
    log.info("system apache reloaded include=%s", include)
