"""How a local desktop's processes are confined (``desktop.limits``), as command-line prefixes.

Every process of a desktop with a user of its own starts through ``prlimit`` (per-user rlimits, set
while still root: RLIMIT_NPROC counts the processes of the uid, so it caps a fork bomb), ``nice`` and
``setpriv`` (:func:`rlimit_argv`). Where systemd runs the machine, the X server and the session each
start in a transient cgroup scope of their own first (:func:`scope_argv`: ``systemd-run --scope`` with
TasksMax, MemoryMax and CPUWeight), and the rlimits stay a second line of defence. Which of the two
applies is decided once per gateway run (:func:`cgroup_scopes`) and said by :func:`describe_limits`
(`gateway status`, the start-up log). Pure functions apart from that probe; the argv of both paths
is tested as text, since a test machine need not run systemd.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gateway.model.config import DesktopLimits

__all__ = ["CgroupScopes", "cgroup_scopes", "scope_argv", "rlimit_argv", "size_bytes", "describe_limits"]

log = logging.getLogger("gateway.limits")


@dataclass(frozen=True, slots=True)
class CgroupScopes:
    """How this machine's systemd runs ``systemd-run --scope``."""

    #: systemd 254 and later expand ``$VAR`` and ``${VAR}`` in a scope's command line unless given
    #: ``--expand-environment=no``, an option that older versions refuse.
    expands_environment: bool


@functools.cache
def cgroup_scopes() -> CgroupScopes | None:
    """Whether desktops start in cgroup scopes here, and how; None: per-user rlimits and nice only.

    Scopes need root, systemd as PID 1 that booted the machine (``/run/systemd/system``), the cgroup v2
    hierarchy that MemoryMax= and CPUWeight= act on, ``systemd-run``, and a manager that answers
    ``systemctl``. Checked once, by the first call, which logs the outcome: `gateway up` makes it at
    start-up (for `gateway status`) before any desktop starts, so its one short ``systemctl`` call
    never stalls a running event.
    """
    why_not = _why_no_scopes()
    if why_not is None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            answer = subprocess.run(["systemctl", "show", "--property=Version", "--value"], capture_output=True,
                                    text=True, timeout=10, check=False)
            version = re.match(r"[0-9]+", answer.stdout.strip())
            if answer.returncode == 0 and version:
                log.info("desktop limits: cgroup scopes (systemd %s) and per-user rlimits", version.group())
                return CgroupScopes(expands_environment=int(version.group()) >= 254)
        why_not = "systemctl does not answer"
    log.info("desktop limits: per-user rlimits and nice, no cgroup scopes (%s)", why_not)
    return None


def _why_no_scopes() -> str | None:
    if os.geteuid() != 0:
        return "the gateway does not run as root"
    try:
        pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:
        pid1 = "?"
    if pid1 != "systemd" or not Path("/run/systemd/system").is_dir():
        return f"PID 1 is {pid1}, not systemd"
    if not Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        return "no cgroup v2 hierarchy at /sys/fs/cgroup"
    if shutil.which("systemd-run") is None:
        return "systemd-run is not installed"
    return None


def scope_argv(user_name: str, program: str, limits: DesktopLimits, scopes: CgroupScopes, *,
               unit_suffix: str | None = None) -> list[str]:
    """``systemd-run`` putting the command after it in a scope of its own, with the desktop's limits.

    The scope is ``workshop-gateway-USER-PROGRAM-XXXXXX.scope``: the random suffix lets a new session
    start while the previous session's scope still holds leftovers. ``--collect`` unloads a scope once
    its processes are gone, also after an out-of-memory kill. systemd-run execs the command itself, so
    the pid, process group and start time recorded for the desktop stay those of its process.
    """
    what = re.sub(r"[^a-z0-9_.-]+", "_", Path(program).name.lower()).strip("_.-") or "desktop"
    unit = f"workshop-gateway-{user_name}-{what}-{unit_suffix or secrets.token_hex(3)}.scope"
    properties = [f"TasksMax={limits.processes}", f"CPUWeight={limits.cpu_weight}"]
    if limits.memory_per_desktop:
        size = limits.memory_per_desktop
        properties.append(f"MemoryMax={size if size.endswith('%') else size_bytes(size)}")
    return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}",
            f"--description=Workshop desktop of {user_name}: {what}",
            *(["--expand-environment=no"] if scopes.expands_environment else []),
            *(word for p in properties for word in ("--property", p)), "--"]


def rlimit_argv(uid: int, gid: int, limits: DesktopLimits) -> list[str]:
    """``prlimit``, ``nice`` and ``setpriv`` to ``uid`` for good; the command follows."""
    rlimits = [f"--nproc={limits.processes}:{limits.processes}"]
    if limits.memory_per_process:
        size = size_bytes(limits.memory_per_process)
        rlimits.append(f"--as={size}:{size}")
    return ["prlimit", *rlimits, "--", "nice", "-n", str(limits.nice),
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--no-new-privs", "--"]


def size_bytes(size: str) -> int:
    """``4G``, ``512M`` ... in bytes; a bare number is MiB (as in Slurm's --mem)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size) * (1 << 20)


def describe_limits(users_mode: str, limits: DesktopLimits, scopes: CgroupScopes | None) -> str:
    """What confines each local desktop, in words (``users_mode``: create, existing or gateway)."""
    if users_mode == "gateway":
        return (f"desktops run as the gateway's user; nice {limits.nice}; no per-desktop process limit "
                "(no cgroup scopes, no per-user rlimits)")
    memory = f", {limits.memory_per_process} address space per process" if limits.memory_per_process else ""
    rlimits = f"per-user rlimits: {limits.processes} processes{memory}; nice {limits.nice}"
    if scopes is None:
        return (f"one user per desktop ({users_mode}); enforced by per-user rlimits and nice (no cgroup "
                f"scopes: systemd does not run this machine): {rlimits}")
    return (f"one user per desktop ({users_mode}); enforced by cgroup scopes (systemd), one each for a desktop's "
            f"X server and session: at most {limits.processes} tasks, memory {limits.memory_per_desktop or 'unlimited'}, "
            f"CPU weight {limits.cpu_weight}; and {rlimits}")
