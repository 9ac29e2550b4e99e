"""View-only passwords: instructors watch a desktop without being able to touch it.

TigerVNC's password file holds two passwords: ``vncpasswd -f`` reads the full one from the first
line of its input and the view-only one from the second. The view-only password of an account is
random, made once and kept (0600) in the state dir, so it survives restarts and re-adoption. It is
replaced (:func:`rotate_view_only_password`) when a share link that handed it out expires or is revoked.
"""

from __future__ import annotations

from pathlib import Path

from gateway.common.files import atomic_write, read_or_create_secret
from gateway.model.tokens import generate_password

__all__ = ["view_only_password", "vncpasswd_input", "rotate_view_only_password", "view_only_made_at"]


def _path(state_dir: Path, account_id: str) -> Path:
    return state_dir / "secrets" / f"{account_id}.viewonly"


def view_only_password(state_dir: Path, account_id: str) -> str:
    """The account's view-only password, made (0600) the first time it is asked for."""
    return read_or_create_secret(_path(state_dir, account_id), generate_password)


def rotate_view_only_password(state_dir: Path, account_id: str) -> None:
    """A new view-only password for the account (the desktop's password file must be rewritten)."""
    atomic_write(_path(state_dir, account_id), generate_password() + "\n", mode=0o600)


def view_only_made_at(state_dir: Path, account_id: str) -> float:
    """When the account's current view-only password was made (0 if none was yet)."""
    try:
        return _path(state_dir, account_id).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def vncpasswd_input(password: str, view_only: str | None) -> bytes:
    """What ``vncpasswd -f`` reads on stdin: the full password, then the view-only one."""
    lines = [password] + ([view_only] if view_only else [])
    return ("\n".join(lines) + "\n").encode()
