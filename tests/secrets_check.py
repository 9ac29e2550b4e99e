"""One check of issue 9's secrets rules, for runs of any backend.

- The state dir and its ``secrets`` dir are 0700; every secret file is 0600 (VNC password files,
  view-only passwords, the admin password, the web-session key, Slurm's per-job secret).
- No password (participants', view-only, admin) is in any other file under the state dir (logs,
  database, Apache's access log, i.e. the URLs requested, job scripts and outputs), in the gateway's
  output, or on any process's command line on this machine.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.os_check import proc_files

__all__ = ["assert_secrets_kept"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_secrets_kept(state_dir: Path, passwords: Sequence[str], *, output: Path | None = None,
                        other_secret_files: Iterable[Path] = (), other_dirs: Iterable[Path] = ()) -> list[Path]:
    """Assert the rules above; returns the secret files it checked (for further assertions)."""
    assert _mode(state_dir) == 0o700, f"{state_dir} is {_mode(state_dir):o}"
    secrets_dir = state_dir / "secrets"
    assert _mode(secrets_dir) == 0o700, f"{secrets_dir} is {_mode(secrets_dir):o}"
    secret_files = [p for p in secrets_dir.rglob("*") if p.is_file()] + list(other_secret_files)
    assert (secrets_dir / "admin.password") in secret_files
    for path in secret_files:
        assert _mode(path) == 0o600, f"{path} is {_mode(path):o}"
    needles = [p.encode() for p in passwords]
    for path in secret_files:
        if path.suffix in (".viewonly", ".password"):
            needles.append(path.read_bytes().strip())
    assert all(len(n) >= 6 for n in needles)

    # Every other file: logs, the database, Apache's access log (the URLs), job scripts and outputs.
    checked = 0
    secret_set = set(secret_files)
    for directory in (state_dir, *other_dirs):
        for path in directory.rglob("*"):
            if path in secret_set or not path.is_file():
                continue
            data = path.read_bytes()
            found = [n.decode() for n in needles if n in data]
            assert not found, f"a password is in {path}"
            checked += 1
    assert checked > 0
    access_log = state_dir / "apache" / "logs" / "access.log"  # the private Apache's: every URL requested
    # Apache logs a websocket request when its tunnel ends, a moment after the client closed it.
    deadline = time.monotonic() + 5
    while not (access_log.exists() and b"/desktop/" in access_log.read_bytes()):
        assert time.monotonic() < deadline, f"no websocket request in {access_log}"
        time.sleep(0.1)
    data = access_log.read_bytes()
    assert not any(n in data for n in needles), f"a password is in a URL in {access_log}"
    if output is not None:
        data = output.read_bytes()
        assert not any(n in data for n in needles), f"a password is in {output}"

    # No command line of any process on this machine (which is also the SSH "host" and Slurm node).
    leaking = passwords_in_command_lines([n.decode() for n in needles])
    assert leaking == [], f"a password is on the command line of pids {leaking}"
    return secret_files


def passwords_in_command_lines(passwords: list[str]) -> list[int]:
    """Pids of any process on this machine whose command line holds one of the passwords."""
    needles = [p.encode() for p in passwords]
    return [pid for pid, cmdline in proc_files("cmdline") if any(n in cmdline for n in needles)]
