"""Desktop backends behind one small interface (see :mod:`gateway.backends.base`).

Which backend serves an account: its token line's ``backend=`` field if given, else the config's
``backend``; accounts whose vnchost is the gateway itself (localhost, 127.0.0.1) always use
``local``. Accounts that want NICE DCV (``protocol=dcv``, or ``protocol=auto`` with ``gpu=yes``; the
config's ``dcv.default_protocol`` when the line has no ``protocol=``) use ``dcv``, which runs Slurm
jobs and falls back to a VNC desktop.

May import: :mod:`gateway.model`, :mod:`gateway.common`. The web and proxy layers use only this
package's public interface: this module, :mod:`~gateway.backends.base`, :mod:`~gateway.backends.dcv_access`
(what the DCV proxy needs to reach a session) and :mod:`~gateway.backends.desktop_users` (whose files
a desktop's are); never a backend's own module (import-linter contract in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.model.config import Config
from gateway.model.tokens import Account
from gateway.backends.base import Backend, BackendError, Endpoint, PollResult, Status

__all__ = ["Backend", "BackendError", "Endpoint", "PollResult", "Status", "backend_name_for", "wants_dcv", "make_backend", "make_backends",
           "backends_with_leftovers"]


def wants_dcv(account: Account, config: Config) -> bool:
    """Whether ``account`` asks for a DCV session (protocol=dcv, or auto on a gpu=yes account)."""
    protocol = account.extra("protocol") or config.dcv.default_protocol
    return protocol == "dcv" or (protocol == "auto" and account.extra("gpu") == "yes")


def backend_name_for(account: Account, config: Config) -> str:
    explicit = account.extra("backend")
    if explicit not in (None, "slurm"):
        return explicit
    if explicit is None and account.is_local:
        return "local"
    if wants_dcv(account, config):
        return "dcv"
    return explicit or config.backend


def make_backend(name: str, config: Config, state_dir: Path) -> Backend:
    """The backend called ``name``; BackendError if this version has none by that name."""
    if name == "local":
        from gateway.backends.local import LocalBackend

        return LocalBackend(config, state_dir)
    if name == "slurm":
        from gateway.backends.slurm import SlurmBackend

        return SlurmBackend(config, state_dir)
    if name == "ssh":
        from gateway.backends.ssh import SshBackend

        return SshBackend(config, state_dir)
    if name == "dcv":
        from gateway.backends.dcv import DcvBackend

        return DcvBackend(config, state_dir)
    raise BackendError(f"backend {name!r} is not available in this version")


def make_backends(config: Config, state_dir: Path, accounts: Sequence[Account]) -> dict[str, Backend]:
    """One instance of each backend that these accounts need (plus ``local``, always)."""
    wanted = {backend_name_for(a, config) for a in accounts} | {"local"}
    return {name: make_backend(name, config, state_dir) for name in sorted(wanted)}


def backends_with_leftovers(state_dir: Path) -> list[str]:
    """Backends that left something besides desktops (a Slurm reservation) for `gateway down` to remove."""
    from gateway.backends.slurm import SlurmBackend

    return ["slurm"] if SlurmBackend.has_leftovers(state_dir) else []
