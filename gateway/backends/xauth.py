"""X authorization cookies: only the desktop's own user (and root) can open its display.

Xvnc is started with ``-auth FILE`` and the session gets ``XAUTHORITY=FILE``. Without it any local
user could connect to another participant's display (through the Unix or the abstract socket) and
watch it or type into it. The file holds one MIT-MAGIC-COOKIE-1 entry for any address and any display
number (FamilyWild, empty number): Xvnc picks its display number itself (``-displayfd``), after the file
is written, and reads every cookie in the file whatever its number.

The local backend writes the file here; a Slurm job and an SSH host write it themselves, with the
shell text of :func:`xauthority_shell`, made from the same bytes: the format is defined once.
"""

from __future__ import annotations

import secrets
import string
import struct
from pathlib import Path

from gateway.common.files import atomic_write

__all__ = ["write_xauthority", "xauthority_bytes", "xauthority_shell", "COOKIE_BYTES"]

_FAMILY_WILD = 0xFFFF
_COOKIE_NAME = b"MIT-MAGIC-COOKIE-1"
#: Length of the random cookie.
COOKIE_BYTES = 16
#: Bytes that stand for themselves in a printf format; every other byte is written as \ooo (octal).
_PRINTF_PLAIN = frozenset(string.ascii_letters + string.digits + "-")


def xauthority_bytes(cookie: bytes) -> bytes:
    """One Xauthority entry (the format of libXau: big-endian lengths, then the bytes)."""
    def counted(field: bytes) -> bytes:
        return struct.pack(">H", len(field)) + field

    return struct.pack(">H", _FAMILY_WILD) + counted(b"") + counted(b"") + counted(_COOKIE_NAME) + counted(cookie)


def write_xauthority(path: Path, *, owner: tuple[int, int] | None = None) -> None:
    """A new random cookie in ``path`` (0600, owned by ``owner``)."""
    atomic_write(path, xauthority_bytes(secrets.token_bytes(COOKIE_BYTES)), mode=0o600, owner=owner)


def xauthority_shell(target: str) -> str:
    """Shell text that writes a new Xauthority file to ``target`` (shell text, e.g. ``"$XAUTHORITY"``).

    The entry's fixed bytes (what :func:`xauthority_bytes` puts before the cookie) come from printf,
    the cookie from ``head -c 16 /dev/urandom``: builtins and a pipe, so the cookie is on no command line.
    """
    header = xauthority_bytes(bytes(COOKIE_BYTES))[:-COOKIE_BYTES]
    escaped = "".join(chr(b) if chr(b) in _PRINTF_PLAIN else f"\\{b:03o}" for b in header)
    return f"{{ printf '{escaped}'; head -c {COOKIE_BYTES} /dev/urandom; }} >{target}"
