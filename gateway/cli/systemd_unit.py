"""Running the gateway unattended as a systemd service: `gateway systemd install [--after-event]`.

The unit is rendered from templates/gateway.service.j2 and depends on the config, because desktops
are the service's children and inherit its sandbox: every directory a desktop or the gateway writes
must be in ``ReadWritePaths`` (:func:`service_spec` finds them: the state dir, the users' homes or the
``desktop.workspace`` root, ``slurm.shared_dir``, Apache's include directory in system mode).

``--after-event`` writes a different unit: downloads only. It starts no desktop and makes no user, and
it reads no workspace (`gateway archive` packs them beforehand, as root, from the command line), so it
keeps root's uid but none of the powers over other users' files and processes.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.backends import backend_name_for
from gateway.backends.desktop_users import user_name_for
from gateway.model.config import PROJECT_ROOT, Config, parse_listen
from gateway.model.errors import UserError
from gateway.model.tokens import TokenFile
from gateway.common.files import atomic_write
from gateway.common.render import UnsafeValue, register_filter, render

__all__ = ["ServiceSpec", "service_spec", "render_service", "install_service", "workspace_root", "UNIT_NAME",
           "EVENT_CAPABILITIES", "DESKTOP_NAMESPACES"]

UNIT_NAME = "workshop-gateway.service"
DEFAULT_STATE_DIRECTORY = "workshop-gateway"  # /var/lib/workshop-gateway, made by systemd

#: What starting desktops as their users takes (the template's comment says which needs which).
EVENT_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH",
                      "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE")
#: The namespaces a browser's sandbox makes inside a desktop: Chromium user, pid and net; Firefox
#: also ipc. Mount, UTS, cgroup and time namespaces stay forbidden.
DESKTOP_NAMESPACES = ("user", "pid", "net", "ipc")
#: The directories ProtectHome= hides or makes read-only.
_HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))

_SAFE_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def systemd_word(value: object) -> str:
    """One word of a unit file: plain when safe, else double-quoted; refuses what can't be quoted."""
    text = str(value)
    if _SAFE_WORD.fullmatch(text):
        return text
    if any(c in text for c in '"\\\n\r\x00$%') or not text:
        raise UnsafeValue(f"value {text[:60]!r} cannot be used in a unit file")
    return f'"{text}"'


register_filter("systemd_word", systemd_word)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    tokens: Path
    config: Path | None
    listen: str
    gateway: Path = Path(sys.executable).with_name("gateway")
    state_directory: str = DEFAULT_STATE_DIRECTORY
    #: desktop.users: create (the service makes users: /etc) or existing (lab accounts); an after-event
    #: service starts no desktop, whichever it is.
    users: Literal["create", "existing", "gateway"] = "create"
    #: Where desktops and the gateway write besides the state dir, /tmp and /etc: the users' homes or
    #: the desktop.workspace root, slurm.shared_dir, Apache's include directory (apache.mode system).
    writable: tuple[str, ...] = ("/home",)
    #: `gateway up --after-event`: the downloads only, for the weeks after the event.
    after_event: bool = False
    #: apache.mode: private hands its workers to apache.user (setuid/setgid while the service is root).
    apache_mode: str = "private"
    #: What the service reads outside the state dir (the token file, config, TLS files, the gateway's
    #: code): ProtectHome= must leave those that are under /home or /root visible.
    reads: tuple[str, ...] = ()

    @property
    def state_dir(self) -> Path:
        return Path("/var/lib") / self.state_directory

    def argv(self) -> list[str]:
        argv = [str(self.gateway), "up", str(self.tokens), "--listen", self.listen, "--state-dir", str(self.state_dir)]
        if self.config is not None:
            argv[3:3] = ["--config", str(self.config)]
        if self.after_event:
            argv.append("--after-event")
        return argv

    def read_write_paths(self) -> list[str]:
        if self.after_event:
            paths = [str(self.state_dir)] + (list(self.writable) if self.apache_mode == "system" else [])
        else:
            # /tmp: the X servers' sockets (/tmp/.X11-unix, private to the service and its desktops).
            paths = [str(self.state_dir), "/tmp"] + (["/etc"] if self.users == "create" else []) + list(self.writable)
        return _outermost(paths)

    def capabilities(self) -> list[str]:
        if not self.after_event:
            return list(EVENT_CAPABILITIES)
        _, port = parse_listen(self.listen)
        listens_on_privileged = port < 1024 and self.apache_mode != "system"  # system: the site's Apache listens
        return ((["CAP_NET_BIND_SERVICE"] if listens_on_privileged else [])
                + (["CAP_SETUID", "CAP_SETGID"] if self.apache_mode == "private" else []))

    def protect_home(self) -> str:
        if not self.after_event and any(_under_home(p) for p in self.read_write_paths()):
            return "no"  # ReadWritePaths below makes exactly those writable; the rest stays read-only
        if self.after_event and not any(_under_home(p) for p in self.reads):
            return "yes"
        return "read-only"


def _under_home(path: str) -> bool:
    return any(Path(path) == root or root in Path(path).parents for root in _HOME_ROOTS)


def _outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without duplicates and without those inside another, in their first order."""
    kept: list[str] = []
    for path in paths:
        p = Path(path)
        if not any(p == Path(k) or Path(k) in p.parents for k in kept):
            kept = [k for k in kept if p not in Path(k).parents] + [path]
    return kept


def workspace_root(template: str) -> str | None:
    """The directory under which ``desktop.workspace`` puts every account's workspace; None when that
    is in the state dir."""
    if template.startswith("{state_dir}"):
        return None
    prefix = template.split("{", 1)[0]
    return str(Path(prefix) if prefix.endswith("/") else Path(prefix).parent)


def service_spec(tokens: TokenFile, config: Config, *, tokens_path: Path, config_path: Path | None, listen: str,
                 after_event: bool) -> ServiceSpec:
    """The unit for this token file and config; UserError when no unit could run them."""
    users = config.desktop.users or "create"  # the service runs as root
    if users == "gateway" and not after_event:
        raise UserError("desktop.users: gateway runs every desktop as the gateway's user, and the service "
                        "runs as root; use desktop.users: create or existing for a service")
    writable: list[str] = []
    if not after_event:
        writable += _desktop_dirs(tokens, config, users)
        if config.slurm.shared_dir:
            writable.append(config.slurm.shared_dir)
    if config.apache.mode == "system":
        writable.append(str(Path(config.apache.system_include).parent))
    missing = [path for path in writable if not Path(path).is_dir()]
    if missing:
        raise UserError(f"{missing[0]}: no such directory; the service can write only into directories that "
                        f"exist when it starts (ProtectSystem=strict): create it first (mkdir -p {missing[0]})")
    spec = ServiceSpec(tokens=tokens_path, config=config_path, listen=listen, users=users, writable=tuple(writable),
                       after_event=after_event, apache_mode=config.apache.mode,
                       reads=tuple(service_inputs(tokens_path, config_path, config)))
    if after_event:
        for path in spec.reads:
            if not os.path.exists(path):
                raise UserError(f"{path}: no such file (the after-event service reads it)")
            if not _root_reads_without_override(Path(path)):
                raise UserError(f"{path}: the after-event service runs as root without the power to read other "
                                "users' files; make it readable by root (owned by root, or readable by all) or "
                                "move it")
    return spec


def _desktop_dirs(tokens: TokenFile, config: Config, users: str) -> list[str]:
    """Where local desktops keep their files (their users' homes), as few directories as cover them."""
    local = [a for a in tokens.accounts if backend_name_for(a, config) == "local"]
    if not local:
        return []
    if config.desktop.workspace is not None:
        root = workspace_root(config.desktop.workspace)
        if root == "/":
            raise UserError("desktop.workspace: the service would have to make / writable; put the workspaces "
                            "in a directory of their own, e.g. /srv/workspaces/{user}")
        return [root] if root else []
    if users == "create":
        return ["/home"]
    homes = []  # existing users: their own homes, wherever passwd says they are
    for account in local:
        name = user_name_for(account.id, config)
        try:
            home = Path(pwd.getpwnam(name or "").pw_dir)
        except KeyError:
            continue  # `gateway up` says so before anything starts
        homes.append(str(home.parent if home.parent != Path("/") else home))
    return homes or ["/home"]


def service_inputs(tokens_path: Path, config_path: Path | None, config: Config) -> list[str]:
    """Files and directories the service reads outside its state dir."""
    paths = [tokens_path, config_path, config.tls.cert, config.tls.key, config.admin.password_file,
             Path(sys.executable).with_name("gateway"), Path(sys.executable).resolve(), Path(sys.base_prefix).resolve(),
             PROJECT_ROOT]
    return [str(Path(p)) for p in paths if p is not None]


def _root_reads_without_override(path: Path) -> bool:
    """Whether root reads ``path`` by its permission bits alone (no CAP_DAC_OVERRIDE or _READ_SEARCH)."""
    try:
        chain = [*reversed(path.parents), path]
        for i, part in enumerate(chain):
            info = os.stat(part)
            need = 0o4 if i == len(chain) - 1 else 0o1  # read the file; search each directory above it
            if stat.S_ISDIR(info.st_mode) and i == len(chain) - 1:
                need = 0o5
            shift = 6 if info.st_uid == 0 else 3 if info.st_gid == 0 else 0
            if ((info.st_mode >> shift) & need) != need:
                return False
    except OSError:
        return False
    return True


def _capability_notes(capabilities: list[str]) -> list[str]:
    notes = (["net_bind_service: listening below port 1024"] if "CAP_NET_BIND_SERVICE" in capabilities else []) + \
            (["setuid/setgid: the private Apache hands its workers to apache.user"] if "CAP_SETUID" in capabilities
             else [])
    return notes or ["no capability: nothing listens below port 1024 or changes user"]


def render_service(spec: ServiceSpec) -> str:
    return render(
        "gateway.service.j2",
        argv=spec.argv(),
        tokens=spec.tokens,
        readme=PROJECT_ROOT / "README.md",
        state_directory=spec.state_directory,
        after_event=spec.after_event,
        users=spec.users,
        capabilities=spec.capabilities(),
        capability_notes=_capability_notes(spec.capabilities()),
        read_write_paths=spec.read_write_paths(),
        protect_home=spec.protect_home(),
        desktop_namespaces=DESKTOP_NAMESPACES,
    )


def install_service(spec: ServiceSpec, unit_dir: Path) -> Path:
    """Write the unit file; the token file and config must be absolute paths that exist."""
    for path in (spec.tokens, spec.config):
        if path is not None and not (path.is_absolute() and path.is_file()):
            raise UserError(f"{path}: give an absolute path to an existing file (the service runs elsewhere)")
    if not os.access(spec.gateway, os.X_OK):
        raise UserError(f"{spec.gateway}: not executable; install the gateway first (scripts/setup)")
    unit = unit_dir / UNIT_NAME
    atomic_write(unit, render_service(spec), mode=0o644)
    return unit
