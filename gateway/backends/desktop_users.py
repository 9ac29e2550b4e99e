"""Which Unix user each local desktop runs as, and making, checking and removing those users.

Participants are strangers: every local desktop (Xvnc, the session and everything started in it) runs
as a Unix user of its own, never root and never the gateway's user, so that nothing of the gateway
(state dir, token file, secrets, control socket) and nothing of another participant is reachable from
a desktop. ``desktop.users`` chooses where the users come from:

* ``create`` (the default as root): users made for the event, named ``user_prefix`` + the account in
  lower case. Each carries this event's marker in its GECOS field and is listed in
  ``STATE_DIR/users.json``, so a second event on the machine can never take them over, and
  ``gateway users remove`` deletes exactly these and nothing else.
* ``existing``: lab or cluster accounts; a user named like the account must exist.
* ``gateway``: every desktop runs as the gateway's user; a single-user trial on a laptop only.

The per-desktop files the user's processes must read (the VNC password file, the Xauthority
cookie) live in ``/run/workshop-gateway/USER``: a directory owned by root (0711) so the user can
reach its own files (0600, owned by the user) but can neither list the directory nor replace them.

Limits (``desktop.limits``): every process of a desktop with a user of its own starts under per-user
rlimits (``prlimit``: RLIMIT_NPROC counts per user, so it caps a fork bomb) and ``nice``. Where systemd
runs the machine, the X server and the session each start in a transient cgroup scope of their own as
well (``systemd-run --scope``: TasksMax, MemoryMax, CPUWeight), the rlimits staying a second line of
defence; :func:`limits_in_force` says which applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.backends import desktop_limits
from gateway.model.config import Config, DesktopLimits
from gateway.model.errors import Problem, UserError
from gateway.common.files import atomic_write
from gateway.common.polling import Backoff, PollTimeout, poll_until
from gateway.common.proc import run
from gateway.model.tokens import Account

__all__ = [
    "DesktopUser",
    "users_mode",
    "user_name_for",
    "check_desktop_users",
    "ensure_users",
    "remove_users",
    "recorded_users",
    "desktop_runtime_dir",
    "launch_argv",
    "kill_user_processes",
    "limits_in_force",
    "RUNTIME_ROOT",
    "account_workspace",
    "workspace_for",
    "ensure_runtime_dir",
    "uid_min",
]

#: Per-desktop files that the desktop's user must read (password file, Xauthority).
RUNTIME_ROOT = Path("/run/workshop-gateway")
_USER_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_MARKER_PREFIX = "workshop-gateway event "


@dataclass(frozen=True, slots=True)
class DesktopUser:
    """The Unix user a desktop runs as."""

    name: str
    uid: int
    gid: int
    home: str
    #: Made for this event: every process of this user belongs to the desktop (stop kills them all).
    owned: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "DesktopUser":
        return cls(str(data["name"]), int(data["uid"]), int(data["gid"]), str(data["home"]),  # type: ignore[arg-type]
                   bool(data["owned"]))


def users_mode(config: Config) -> str:
    """create, existing or gateway (``desktop.users``; unset: create as root, else gateway)."""
    if config.desktop.users is not None:
        return config.desktop.users
    return "create" if os.geteuid() == 0 else "gateway"


def user_name_for(account_id: str, config: Config) -> str | None:
    """The Unix user of ``account_id``'s desktop, or None when desktops run as the gateway's user."""
    mode = users_mode(config)
    if mode == "gateway":
        return None
    if mode == "existing":
        return account_id
    return config.desktop.user_prefix + account_id.lower()


def event_marker(state_dir: Path) -> str:
    """What the GECOS field of this event's users says: one event per state dir."""
    return _MARKER_PREFIX + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]


def uid_min() -> int:
    """The first uid of ordinary users (UID_MIN in /etc/login.defs, 1000 if not set)."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/login.defs").read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "UID_MIN" and fields[1].isdigit():
                return int(fields[1])
    return 1000


def _lookup(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


# -- checking, before anything starts ------------------------------------------------------------


def check_desktop_users(accounts: Sequence[Account], config: Config, state_dir: Path, *, tokens_path: str,
                        listen_host: str) -> list[Problem]:
    """Every reason the local accounts can't get a user of their own, as ``PATH:LINE`` problems.

    Raises :class:`UserError` for a mode that can't be used at all on this machine.
    """
    mode = users_mode(config)
    if mode == "gateway":
        _check_gateway_mode(config, listen_host)
        return []
    if os.geteuid() != 0:
        raise UserError(f"desktop.users: {mode} needs the gateway to run as root (it starts each desktop as "
                        "its account's user); run it as root, or use desktop.users: gateway for a "
                        "single-user trial on 127.0.0.1")
    problems: list[Problem] = []
    first_uid, marker = uid_min(), event_marker(state_dir)
    taken: dict[int, str] = {}  # uid -> the account whose desktop runs as it
    for account in accounts:
        name = user_name_for(account.id, config)
        assert name is not None
        where = (tokens_path, account.line)
        found = [Problem(*where, m) for m in _account_user_problems(account.id, name, mode, config,
                                                                    first_uid, marker, state_dir)]
        entry = _lookup(name)
        if not found and entry is not None:
            other = taken.setdefault(entry.pw_uid, account.id)
            if other != account.id:  # two names, one uid: one participant could read the other's files
                found.append(Problem(*where, f"account {account.id}: the user {name!r} has uid {entry.pw_uid}, "
                                             f"like account {other}'s user; each account needs a user of its own"))
        problems += found
    return problems


def _check_gateway_mode(config: Config, listen_host: str) -> None:
    if os.geteuid() == 0:
        raise UserError("desktop.users: gateway would run every participant's desktop as root; use "
                        "desktop.users: create (the default as root) or existing")
    if listen_host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"desktop.users: gateway (every desktop as the gateway's own user) is only for a "
                        f"single-user trial on 127.0.0.1, not on {listen_host}; run the gateway as root so "
                        "that each desktop gets a user of its own")


def _account_user_problems(account_id: str, name: str, mode: str, config: Config, first_uid: int, marker: str,
                           state_dir: Path) -> list[str]:
    if not _USER_NAME_RE.fullmatch(name):
        return [f"account {account_id}: {name!r} can't be a Unix user name (at most 32 of a-z 0-9 _ . -); "
                "use a shorter account or desktop.user_prefix"]
    entry = _lookup(name)
    if mode == "existing":
        if entry is None:
            return [f"account {account_id}: no user {name!r} on this machine (desktop.users: existing needs "
                    "one user per account); create it, or use desktop.users: create"]
    elif entry is not None and entry.pw_gecos != marker:
        return [f"account {account_id}: the user {name!r} already exists and was not made for this event "
                f"(state dir {state_dir}); choose another desktop.user_prefix"]
    elif entry is None:
        home = Path(workspace_for(account_id, name, config, state_dir, None))
        if home.exists():
            return [f"account {account_id}: {home} already exists and would become the new user {name!r}'s "
                    "home; move it away or set desktop.workspace"]
        return []
    if entry.pw_uid == 0 or entry.pw_uid < first_uid:
        return [f"account {account_id}: the user {name!r} is a system account (uid {entry.pw_uid} < UID_MIN "
                f"{first_uid}); desktops never run as one"]
    if entry.pw_uid == os.geteuid():
        return [f"account {account_id}: the user {name!r} is the gateway's own user"]
    return []


def workspace_for(account_id: str, user_name: str | None, config: Config, state_dir: Path,
                  existing_home: str | None) -> str:
    """The account's HOME: ``desktop.workspace``, else what suits where its user comes from."""
    template = config.desktop.workspace
    if template is None:
        if user_name is None:
            template = "{state_dir}/workspaces/{account}"
        elif existing_home is not None:
            return existing_home
        else:
            template = "/home/{user}"
    return template.format(account=account_id, user=user_name or "", state_dir=state_dir)


# -- making and removing -------------------------------------------------------------------------


def _registry_path(state_dir: Path) -> Path:
    return state_dir / "users.json"


def recorded_users(state_dir: Path) -> dict[str, DesktopUser]:
    """The users this event made, by account (``STATE_DIR/users.json``)."""
    try:
        data = json.loads(_registry_path(state_dir).read_text())
    except FileNotFoundError:
        return {}
    return {account: DesktopUser.from_json(entry) for account, entry in data.items()}


def _record(state_dir: Path, users: dict[str, DesktopUser]) -> None:
    payload = json.dumps({a: u.to_json() for a, u in sorted(users.items())}, indent=1)
    atomic_write(_registry_path(state_dir), payload + "\n", mode=0o600)


async def ensure_users(accounts: Sequence[Account], config: Config, state_dir: Path) -> dict[str, DesktopUser]:
    """The user of each local account, made now where ``create`` needs it (checked before)."""
    mode = users_mode(config)
    if mode == "gateway":
        return {}
    made = recorded_users(state_dir)
    users: dict[str, DesktopUser] = {}
    for account in accounts:
        name = user_name_for(account.id, config)
        assert name is not None
        entry = _lookup(name)
        if entry is None and mode == "create":
            entry = await _create_user(name, workspace_for(account.id, name, config, state_dir, None), state_dir)
        if entry is None:
            raise UserError(f"account {account.id}: the user {name!r} does not exist")
        users[account.id] = DesktopUser(name, entry.pw_uid, entry.pw_gid,
                                        workspace_for(account.id, name, config, state_dir, entry.pw_dir),
                                        owned=(mode == "create"))
        if mode == "create" and made.get(account.id) != users[account.id]:
            made[account.id] = users[account.id]
            _record(state_dir, made)  # at once: a crash later must not forget a user it made
    return users


async def _create_user(name: str, home: str, state_dir: Path) -> pwd.struct_passwd:
    Path(home).parent.mkdir(parents=True, exist_ok=True)
    # A locked password (useradd's default): nobody logs in as this user; only its desktop runs as it.
    argv = ["useradd", "--create-home", "--home-dir", home, "--shell", "/bin/bash", "--user-group",
            "--comment", event_marker(state_dir), "--key", "UMASK=077", name]
    result = await run(argv, timeout_s=30)
    if not result.ok:
        detail = result.stderr.decode(errors="replace").strip()
        raise UserError(f"could not create the user {name!r}: {detail or result.returncode}")
    entry = pwd.getpwnam(name)
    os.chmod(home, 0o700)
    return entry


async def remove_users(state_dir: Path, *, delete_homes: bool) -> list[str]:
    """Delete the users this event made (and nothing else); returns a line per user for the organiser.

    Their homes are kept for `gateway archive` unless ``delete_homes``; a kept home is handed to root
    (0700), so that a user made later with the same uid never inherits a stranger's files.
    """
    made = recorded_users(state_dir)
    marker = event_marker(state_dir)
    lines = []
    for account, user in sorted(made.items()):
        entry = _lookup(user.name)
        if entry is not None and (entry.pw_gecos != marker or entry.pw_uid != user.uid):
            lines.append(f"{user.name}: left alone (it is no longer this event's user)")
        else:
            if entry is not None:
                await kill_user_processes(user.uid)
                result = await run(["userdel", user.name], timeout_s=30)
                if not result.ok:
                    lines.append(f"{user.name}: userdel failed: {result.stderr.decode(errors='replace').strip()}")
                    continue
            lines.append(f"{user.name}: removed; " + _release_home(Path(user.home), delete_homes))
            shutil.rmtree(desktop_runtime_dir(user.name), ignore_errors=True)
        del made[account]
        _record(state_dir, made)
    return lines


def _release_home(home: Path, delete: bool) -> str:
    if not home.is_dir() or home.is_symlink():
        return "no home"
    if delete:
        shutil.rmtree(home, ignore_errors=True)
        return f"home {home} deleted"
    for path in [home, *home.rglob("*")]:
        with contextlib.suppress(OSError):
            os.lchown(path, 0, 0)
    os.chmod(home, 0o700)
    return f"home {home} kept (now owned by root)"


# -- running as the user -------------------------------------------------------------------------


def desktop_runtime_dir(user_name: str) -> Path:
    """``/run/workshop-gateway/USER``: root's (0711), holding the user's own 0600 files."""
    return RUNTIME_ROOT / user_name


def ensure_runtime_dir(user: DesktopUser) -> Path:
    """Create the user's runtime dir and, inside it, its own XDG_RUNTIME_DIR (``xdg``, 0700)."""
    for directory in (RUNTIME_ROOT, desktop_runtime_dir(user.name)):
        directory.mkdir(mode=0o711, exist_ok=True)
        if directory.is_symlink() or directory.stat().st_uid != 0:
            raise UserError(f"{directory} is not root's own directory; remove it")
        os.chmod(directory, 0o711)
    xdg = desktop_runtime_dir(user.name) / "xdg"
    xdg.mkdir(mode=0o700, exist_ok=True)
    os.lchown(xdg, user.uid, user.gid)
    return xdg


def launch_argv(argv: Sequence[str], user: DesktopUser | None, limits: DesktopLimits) -> list[str]:
    """``argv`` run as ``user`` under the desktop limits: in a cgroup scope of its own where systemd runs
    the machine, then through ``prlimit``, ``nice`` and ``setpriv`` (:mod:`~gateway.backends.desktop_limits`).

    The limits are set while still root, then ``setpriv`` switches to the user for good (no new
    privileges: setuid programs can't raise them again). Without a user of its own, a desktop runs as
    the gateway's user and only niceness applies: RLIMIT_NPROC would count the gateway's processes too.
    """
    if user is None:
        return ["nice", "-n", str(limits.nice), *argv]
    chain = [*desktop_limits.rlimit_argv(user.uid, user.gid, limits), *argv]
    scopes = desktop_limits.cgroup_scopes()
    return chain if scopes is None else [*desktop_limits.scope_argv(user.name, argv[0], limits, scopes), *chain]


def limits_in_force(config: Config) -> str:
    """What confines each local desktop, in words for `gateway status` and the start-up log."""
    mode = users_mode(config)
    scopes = desktop_limits.cgroup_scopes() if mode != "gateway" else None
    return desktop_limits.describe_limits(mode, config.desktop.limits, scopes)


async def kill_user_processes(uid: int, *, timeout_s: float = 5.0) -> int:
    """SIGKILL every process of ``uid`` (an event user's: all of them belong to its desktop).

    Repeats until none is left, since a process may fork while the list is read. Returns how many.
    """
    killed = 0

    def none_left() -> bool:
        nonlocal killed
        pids = list(_pids_of(uid))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        return not pids

    with contextlib.suppress(PollTimeout):
        await poll_until(none_left, timeout_s=timeout_s, what=f"processes of uid {uid} gone",
                         backoff=Backoff(first_s=0.05, factor=1.0, max_s=0.05))
    return killed


def _pids_of(uid: int) -> Iterable[int]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                if int(line.split()[1]) == uid and "State:\tZ" not in status:
                    yield int(entry.name)
                break


def account_workspace(account_id: str, config: Config, state_dir: Path) -> Path:
    """Where ``account_id``'s files are (for archives), whether or not its desktop runs now."""
    recorded = recorded_users(state_dir).get(account_id)
    if recorded is not None:
        return Path(recorded.home)
    name = user_name_for(account_id, config)
    entry = _lookup(name) if name is not None and users_mode(config) == "existing" else None
    return Path(workspace_for(account_id, name, config, state_dir, entry.pw_dir if entry else None))
