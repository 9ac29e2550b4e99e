"""X authorization cookies: only the desktop's own user (and root) can open its display.

Xvnc is started with ``-auth FILE`` and the session gets ``XAUTHORITY=FILE``. Without it any local
user could connect to another participant's display (through the Unix or the abstract socket) and
watch it or type into it. The file holds one MIT-MAGIC-COOKIE-1 entry for any address and any display
number (FamilyWild, empty number): Xvnc picks its display number itself (``-displayfd``), after the file
is written, and reads every cookie in the file whatever its number.
"""

from __future__ import annotations

import secrets
import struct
from pathlib import Path

from gateway.common.files import atomic_write

__all__ = ["write_xauthority", "xauthority_bytes"]

_FAMILY_WILD = 0xFFFF
_COOKIE_NAME = b"MIT-MAGIC-COOKIE-1"


def xauthority_bytes(cookie: bytes) -> bytes:
    """One Xauthority entry (the format of libXau: big-endian lengths, then the bytes)."""
    def counted(field: bytes) -> bytes:
        return struct.pack(">H", len(field)) + field

    return struct.pack(">H", _FAMILY_WILD) + counted(b"") + counted(b"") + counted(_COOKIE_NAME) + counted(cookie)


def write_xauthority(path: Path, *, owner: tuple[int, int] | None = None) -> None:
    """A new random cookie in ``path`` (0600, owned by ``owner``)."""
    atomic_write(path, xauthority_bytes(secrets.token_bytes(16)), mode=0o600, owner=owner)
