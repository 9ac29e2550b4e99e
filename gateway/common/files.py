"""Writing files so that a crash or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "ensure_private_dir", "read_or_create_secret"]


def atomic_write(path: Path, data: str | bytes, *, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically, created with ``mode`` from its first byte.

    The data is written to a temporary file beside the target, flushed to disk, then renamed over
    it: readers see either the old file or the new one, and if the disk is full the old one stays.
    Secrets use ``mode=0o600`` so they are never briefly readable by others. ``owner`` (uid, gid)
    hands the file to another user (a desktop's) before it appears under its name.
    """
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            # The umask may have narrowed the mode: make it exactly what was asked. Through the
            # descriptor, never the name: in a directory a desktop's user can write, the name could
            # be swapped for a link to another file before a chmod by name.
            os.fchmod(out.fileno(), mode)
            if owner is not None:
                os.fchown(out.fileno(), *owner)
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: it holds password files and state."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def read_or_create_secret(path: Path, make: Callable[[], str], *, owner: tuple[int, int] | None = None) -> str:
    """The secret kept in ``path``; made by ``make()`` and written 0600 (atomically) the first time.

    A missing, empty or not-UTF-8 file counts as missing (other errors, such as no permission, are
    raised: replacing a secret that exists would lock out whoever holds it). ``owner`` hands a new file
    to a user.
    """
    try:
        existing = path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        existing = ""
    if existing:
        return existing
    secret = make()
    atomic_write(path, secret + "\n", mode=0o600, owner=owner)
    return secret
