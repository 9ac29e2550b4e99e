"""Running the gateway unattended as a systemd service: `gateway systemd install`."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.model.config import PROJECT_ROOT
from gateway.model.errors import UserError
from gateway.common.files import atomic_write
from gateway.common.render import UnsafeValue, register_filter, render

__all__ = ["ServiceSpec", "render_service", "install_service", "UNIT_NAME"]

UNIT_NAME = "workshop-gateway.service"
DEFAULT_STATE_DIRECTORY = "workshop-gateway"  # /var/lib/workshop-gateway, made by systemd

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
    #: desktop.users: create: the service makes users (writes /etc) and their homes (/home).
    creates_users: bool = True
    #: `gateway up --after-event`: the downloads only, for the weeks after the event.
    after_event: bool = False

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


def render_service(spec: ServiceSpec) -> str:
    return render(
        "gateway.service.j2",
        argv=spec.argv(),
        tokens=spec.tokens,
        readme=PROJECT_ROOT / "README.md",
        state_directory=spec.state_directory,
        # Apache's system-mode include and the X sockets are the only writes outside the state dir,
        # besides the users the event makes.
        read_write_paths=[spec.state_dir, "/tmp"] + (["/etc", "/home"] if spec.creates_users
                                                     else ["/etc/apache2/conf-enabled"]),
        creates_users=spec.creates_users,
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
