"""Files and directories that must stay private or root's: the one helper every secret file goes through (admin
password, view-only passwords, the session key), and the X servers' socket directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.common.files import read_or_create_secret


def test_a_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "admin.password"
    path.parent.mkdir()
    made = read_or_create_secret(path, lambda: "first-secret")
    assert made == "first-secret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_secret(path, lambda: "second-secret") == "first-secret"  # kept across restarts
    assert [p.name for p in path.parent.iterdir()] == ["admin.password"]  # no temporary file left behind


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xff\xfe not text"])
def test_an_empty_or_garbled_secret_is_made_again(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    assert read_or_create_secret(path, lambda: "fresh") == "fresh"
    assert path.read_text() == "fresh\n" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_secret_can_be_handed_to_its_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("handing a file to another user needs root")
    path = tmp_path / "viewonly"
    read_or_create_secret(path, lambda: "for-nobody", owner=(65534, 65534))
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o600)


def test_a_secret_that_cannot_be_read_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "dir-not-file"
    path.mkdir()  # reading it fails with IsADirectoryError: that is not "missing"
    with pytest.raises(IsADirectoryError):
        read_or_create_secret(path, lambda: "would-overwrite")


def test_the_x_socket_directory_is_roots_and_sticky(tmp_path: Path) -> None:
    """Made by the first participant's Xvnc, it would be theirs: they could delete the others' sockets."""
    if os.geteuid() != 0:
        pytest.skip("handing the directory to root needs root")
    from gateway.backends.local import ensure_x11_socket_dir

    made = tmp_path / "made" / ".X11-unix"
    made.parent.mkdir()
    ensure_x11_socket_dir(made)
    taken = tmp_path / ".X11-unix"
    taken.mkdir(mode=0o755)
    os.chown(taken, 65534, 65534)  # a participant got there first
    ensure_x11_socket_dir(taken)
    for path in (made, taken):
        info = path.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o1777), path
