"""Packing workspaces: real files, a symlink out of the workspace, a FIFO; unpacked with tar/unzip."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from gateway.model.archive import archive_record, pack_accounts, pack_workspace
from gateway.model.state import StateStore
from tests.system import require_program


def make_workspace(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("my work\n")
    (root / "data").mkdir()
    (root / "data" / "table.csv").write_bytes(os.urandom(200_000))
    (root / "data" / "empty").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "etc-link").symlink_to("/etc")
    (root / "data" / "relative-link").symlink_to("../notes.txt")
    os.mkfifo(root / "pipe")
    return root


def tree(root: Path) -> dict[str, object]:
    """Everything under root, without following links: files by content, links by target."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode) & 0o100)
    return found


def without_special(found: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in found.items() if k != "pipe"}


@pytest.mark.parametrize("fmt", ["tar.gz", pytest.param("zip", marks=pytest.mark.system)])
def test_pack_stores_links_as_links_skips_fifos_and_unpacks_to_the_workspace(tmp_path: Path, fmt: str) -> None:
    workspace = make_workspace(tmp_path / "ws01")
    destination = tmp_path / "out" / f"ws01.{fmt}"
    destination.parent.mkdir()
    result = pack_workspace(workspace, destination, root_name="ws01", fmt=fmt, level=6)

    data = destination.read_bytes()
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.size == len(data)
    assert stat.S_IMODE(destination.stat().st_mode) == 0o600
    assert (tmp_path / "out" / f"ws01.{fmt}.sha256").read_text() == f"{result.sha256}  ws01.{fmt}\n"
    assert result.skipped == ("ws01/pipe: named pipe",)
    assert result.files == 3
    assert sorted(p.name for p in destination.parent.iterdir()) == [f"ws01.{fmt}", f"ws01.{fmt}.sha256"]

    # The link to /etc is a link entry, and nothing of /etc is in the archive.
    if fmt == "tar.gz":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            link = tar.getmember("ws01/etc-link")
            assert link.issym() and link.linkname == "/etc"
            assert all(n.startswith("ws01") for n in tar.getnames())
            assert not any(n.startswith("ws01/etc-link/") for n in tar.getnames())
    else:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            info = archive.getinfo("ws01/etc-link")
            assert stat.S_ISLNK(info.external_attr >> 16)
            assert archive.read(info) == b"/etc"
            assert not any(n.startswith("ws01/etc-link/") for n in archive.namelist())
    assert b"root:x:0:0" not in (gzip_inflate(data) if fmt == "tar.gz" else data)

    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    if fmt == "tar.gz":
        subprocess.run(["tar", "-xzf", str(destination), "-C", str(unpacked)], check=True)
    else:
        unzip = require_program("unzip")  # a failure under GATEWAY_REQUIRE_SYSTEM=1 (scripts/setup installs it)
        subprocess.run([unzip, "-q", str(destination), "-d", str(unpacked)], check=True)
    assert tree(unpacked / "ws01") == without_special(tree(workspace))
    assert tree(unpacked / "ws01")["etc-link"] == ("link", "/etc")


def gzip_inflate(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data)


def test_a_workspace_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    real = make_workspace(tmp_path / "other")
    (tmp_path / "ws02").symlink_to(real)
    with pytest.raises(OSError):
        pack_workspace(tmp_path / "ws02", tmp_path / "ws02.tar.gz", root_name="ws02")
    assert not (tmp_path / "ws02.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


async def test_pack_accounts_records_each_archive_and_reports_missing_workspaces(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    make_workspace(state_dir / "workspaces" / "ws01")
    make_workspace(state_dir / "workspaces" / "ws02")
    store = StateStore(state_dir / "gateway.db")
    try:
        jobs = [(a, state_dir / "workspaces" / a) for a in ("ws01", "ws02", "ws03")]
        stream = io.StringIO()
        results = await pack_accounts(store, jobs, state_dir=state_dir, fmt="tar.gz", concurrency=2,
                                      progress_stream=stream)
        assert results["ws03"] == f"no workspace at {state_dir / 'workspaces' / 'ws03'}"
        for account in ("ws01", "ws02"):
            record = archive_record(store, account)
            assert record is not None and record.filename == f"{account}.tar.gz"
            path = state_dir / "archives" / record.filename
            assert hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256
            assert record.skipped == (f"{account}/pipe: named pipe",)
        assert "2/3 archives packed, 1 failed" in stream.getvalue()
        assert stat.S_IMODE((state_dir / "archives").stat().st_mode) == 0o700

        # Packing again as zip replaces the record and the old file.
        await pack_accounts(store, jobs[:1], state_dir=state_dir, fmt="zip", progress_stream=stream)
        record = archive_record(store, "ws01")
        assert record is not None and record.format == "zip"
        assert not (state_dir / "archives" / "ws01.tar.gz").exists()
        assert (state_dir / "archives" / "ws01.zip").exists()
    finally:
        store.close()
