"""Post-event archives: each account's workspace packed into one tar.gz or zip file.

Packing never follows a symbolic link: a link is stored as a link (its target text), and every
directory and file is opened with ``O_NOFOLLOW`` relative to its parent's descriptor, so a link
swapped in while packing cannot lead out of the workspace. FIFOs, sockets and devices are skipped
and listed. An archive is written 0600 into ``{state_dir}/archives`` under a temporary name, with
its SHA-256 computed while writing, renamed when complete (a ``.sha256`` file beside it, in
``sha256sum`` format), and recorded in the state database for the download page.

Packing runs in worker threads (zlib and hashlib release the GIL), a few at a time. Workspaces on
SSH hosts are packed the same way from entries read over SFTP (gateway/backends/remote_archive.py), through
:func:`pack_entries`.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import json
import os
import secrets
import stat
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gateway.common.files import atomic_write, ensure_private_dir
from gateway.common.progress import Progress
from gateway.model.state import StateStore

__all__ = [
    "FORMATS",
    "CHUNK_BYTES",
    "special_kind",
    "PackResult",
    "ArchiveRecord",
    "ArchiveEntry",
    "archives_dir",
    "pack_workspace",
    "pack_entries",
    "pack_accounts",
    "record_archive",
    "archive_record",
    "archive_records",
]

#: Archive formats and their file name suffixes.
FORMATS: dict[str, str] = {"tar.gz": ".tar.gz", "zip": ".zip"}

#: Bytes read and written at a time, here and when packing over SFTP.
CHUNK_BYTES = 1 << 20
_ZIP_EPOCH = time.mktime((1980, 1, 2, 0, 0, 0, 0, 0, -1))  # zip can't store earlier times
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in between lstat and open must not hang the packer.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_SPECIAL_KINDS = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"),
                  (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def special_kind(mode: int) -> str:
    """What a file that is neither regular, directory nor link is, in words (it is skipped and listed)."""
    return next((word for test, word in _SPECIAL_KINDS if test(mode)), "special file")


@dataclass(frozen=True, slots=True)
class PackResult:
    path: Path
    size: int
    sha256: str
    files: int
    #: "relative/path: reason" for everything left out (special files, unreadable files).
    skipped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ArchiveRecord:
    account: str
    format: str
    filename: str
    size: int
    sha256: str
    files: int
    skipped: tuple[str, ...]
    created_at: float


def archives_dir(state_dir: Path) -> Path:
    return state_dir / "archives"


# -- walking a workspace without following links ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One thing to pack, from a local walk or a remote one (:func:`pack_entries` takes either)."""

    kind: str            # "dir", "file" or "link"
    name: str            # path inside the archive, "/"-separated
    st: os.stat_result
    fd: int = -1         # "file": open, read-only; closed by the walker after the consumer returns
    target: str = ""     # "link": what it points to
    #: "file" not on this machine (SFTP): reads up to n bytes; else os.read of ``fd``.
    read: Callable[[int], bytes] | None = None

    def reader(self, size: int) -> "_FixedSizeReader":
        return _FixedSizeReader(self.read or functools.partial(os.read, self.fd), size)


def _walk(dir_fd: int, prefix: str, skipped: list[str]) -> Iterator[ArchiveEntry]:
    with os.scandir(dir_fd) as listing:
        names = sorted(entry.name for entry in listing)
    for name in names:
        path = f"{prefix}/{name}"
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                yield ArchiveEntry("link", path, st, target=os.readlink(name, dir_fd=dir_fd))
            elif stat.S_ISDIR(st.st_mode):
                child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    yield ArchiveEntry("dir", path, os.fstat(child))
                    yield from _walk(child, path, skipped)
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        skipped.append(f"{path}: changed into a special file while packing")
                        continue
                    yield ArchiveEntry("file", path, st, fd=fd)
                finally:
                    os.close(fd)
            else:
                kind = special_kind(st.st_mode)
                skipped.append(f"{path}: {kind}")
        except FileNotFoundError:
            skipped.append(f"{path}: removed while packing")
        except OSError as exc:
            skipped.append(f"{path}: {exc.strerror or exc}")


class _FixedSizeReader:
    """Reads exactly ``size`` bytes of a file that may grow or shrink while it is packed."""

    def __init__(self, read: Callable[[int], bytes], size: int) -> None:
        self._read = read
        self.left = size
        self.changed = False

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        n = min(n if n >= 0 else self.left, self.left)
        if n <= 0:
            return b""
        data = self._read(n)
        while data and len(data) < n:  # remote reads may come in pieces
            more = self._read(n - len(data))
            if not more:
                break
            data += more
        if len(data) < n:  # the file shrank: pad, so the archive stays consistent
            self.changed = True
            data += b"\0" * (n - len(data))
        self.left -= len(data)
        return data


class _HashingWriter:
    """A write-only file that hashes what passes through and counts its position (for zipfile)."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "wb", buffering=CHUNK_BYTES)
        self.hash = hashlib.sha256()
        self.position = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self._file.write(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abandon(self) -> None:
        if not self._file.closed:
            self._file.close()


# -- the two formats ------------------------------------------------------------------------------


def _pack_tar(entries: Iterator[ArchiveEntry], out: _HashingWriter, level: int, changed: list[str]) -> int:
    count = 0
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz:  # type: ignore[arg-type]
        # Large blocks: zlib and the hash cost per call, and tarfile's defaults are 10-16 KiB.
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK_BYTES) as tar:  # type: ignore[call-overload]
            tar.copybufsize = CHUNK_BYTES
            for entry in entries:
                info = tarfile.TarInfo(entry.name)
                info.mtime = int(entry.st.st_mtime)
                info.mode = stat.S_IMODE(entry.st.st_mode)
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == "link":
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry.target
                    info.mode = 0o777
                    tar.addfile(info)
                else:
                    info.size = entry.st.st_size
                    reader = entry.reader(info.size)
                    tar.addfile(info, reader)  # type: ignore[arg-type]
                    if reader.changed:
                        changed.append(f"{entry.name}: shrank while packing (padded)")
                    count += 1
    return count


def _zip_info(name: str, st: os.stat_result, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, time.localtime(max(st.st_mtime, _ZIP_EPOCH))[:6])
    info.create_system = 3  # Unix: unzip restores modes and links from external_attr
    info.external_attr = (mode & 0xFFFF) << 16
    return info


def _pack_zip(entries: Iterator[ArchiveEntry], out: _HashingWriter, level: int, changed: list[str]) -> int:
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level,  # type: ignore[arg-type]
                         allowZip64=True) as archive:
        for entry in entries:
            if entry.kind == "dir":
                info = _zip_info(entry.name + "/", entry.st, stat.S_IFDIR | stat.S_IMODE(entry.st.st_mode))
                info.external_attr |= 0x10  # MS-DOS directory flag
                archive.writestr(info, b"", compress_type=zipfile.ZIP_STORED)
            elif entry.kind == "link":
                info = _zip_info(entry.name, entry.st, stat.S_IFLNK | 0o777)
                archive.writestr(info, os.fsencode(entry.target), compress_type=zipfile.ZIP_STORED)
            else:
                info = _zip_info(entry.name, entry.st, stat.S_IFREG | stat.S_IMODE(entry.st.st_mode))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.file_size = entry.st.st_size
                reader = entry.reader(entry.st.st_size)
                with archive.open(info, "w", force_zip64=entry.st.st_size >= 1 << 31) as member:
                    while chunk := reader.read(CHUNK_BYTES):
                        member.write(chunk)
                if reader.changed:
                    changed.append(f"{entry.name}: shrank while packing (padded)")
                count += 1
    return count


def pack_workspace(workspace: Path, destination: Path, *, root_name: str, fmt: str = "tar.gz",
                   level: int = 6) -> PackResult:
    """Pack ``workspace`` into the file ``destination`` (0600), entries under ``root_name/``.

    Blocking; run it in a thread. Raises FileNotFoundError when the workspace does not exist and
    OSError when it is a symbolic link (not followed) or the archive cannot be written; the
    destination is then left as it was.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown archive format {fmt!r} (use {' or '.join(FORMATS)})")
    root_fd = os.open(workspace, _DIR_FLAGS)
    try:
        def entries(skipped: list[str]) -> Iterator[ArchiveEntry]:
            yield ArchiveEntry("dir", root_name, os.fstat(root_fd))
            yield from _walk(root_fd, root_name, skipped)

        return pack_entries(entries, destination, fmt=fmt, level=level)
    finally:
        os.close(root_fd)


def pack_entries(entries: Callable[[list[str]], Iterator[ArchiveEntry]], destination: Path, *, fmt: str,
                 level: int = 6) -> PackResult:
    """Pack what ``entries(skipped)`` yields (it appends what it leaves out to ``skipped``) into
    ``destination`` (0600, written under a temporary name, renamed when complete), with its SHA-256."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown archive format {fmt!r} (use {' or '.join(FORMATS)})")
    skipped: list[str] = []
    tmp = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")
    out = _HashingWriter(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    try:
        os.fchmod(out._file.fileno(), 0o600)
        pack = _pack_tar if fmt == "tar.gz" else _pack_zip
        files = pack(entries(skipped), out, level, skipped)
        out.finish()
        os.replace(tmp, destination)
    except BaseException:
        out.abandon()
        tmp.unlink(missing_ok=True)
        raise
    digest = out.hash.hexdigest()
    atomic_write(destination.with_name(destination.name + ".sha256"), f"{digest}  {destination.name}\n",
                 mode=0o600)
    return PackResult(destination, out.position, digest, files, tuple(skipped))


# -- many accounts, and their records --------------------------------------------------------------


async def pack_accounts(store: StateStore, workspaces: Sequence[tuple[str, Path]], *, state_dir: Path,
                        fmt: str, level: int = 6, concurrency: int = 4,
                        progress_stream: TextIO | None = None) -> dict[str, PackResult | str]:
    """Pack each ``(account, workspace)``, ``concurrency`` at a time, and record each archive.

    Returns, per account, its result or the reason it has no archive. One account's failure
    never stops the others.
    """
    directory = ensure_private_dir(archives_dir(state_dir))
    limit = asyncio.Semaphore(concurrency)
    progress = Progress(len(workspaces), label="archives packed", stream=progress_stream)
    results: dict[str, PackResult | str] = {}

    async def pack_one(account: str, workspace: Path) -> None:
        async with limit:
            try:
                result = await asyncio.to_thread(
                    pack_workspace, workspace, directory / f"{account}{FORMATS[fmt]}",
                    root_name=account, fmt=fmt, level=level,
                )
            except FileNotFoundError:
                results[account] = f"no workspace at {workspace}"
            except OSError as exc:
                results[account] = f"cannot pack {workspace}: {exc.strerror or exc}"
            else:
                record_archive(store, account, fmt, result)
                results[account] = result
        done = sum(isinstance(r, PackResult) for r in results.values())
        progress.update(done, len(results) - done)

    progress.update(0)
    async with asyncio.TaskGroup() as group:
        for account, workspace in workspaces:
            group.create_task(pack_one(account, workspace), name=f"archive:{account}")
    progress.finish()
    return results


def record_archive(store: StateStore, account: str, fmt: str, result: PackResult) -> None:
    """Record the archive for the download page (replacing, and deleting, an earlier one of another format)."""
    previous = archive_record(store, account)
    with store.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO archives(account, format, filename, size, sha256, files, skipped, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (account, fmt, result.path.name, result.size, result.sha256, result.files,
             json.dumps(list(result.skipped)), time.time()),
        )
    store.record_event("archived", account, f"{result.path.name} {result.size} bytes sha256 {result.sha256}")
    if previous is not None and previous.filename != result.path.name:  # e.g. zip after tar.gz
        for stale in (previous.filename, previous.filename + ".sha256"):
            (result.path.parent / stale).unlink(missing_ok=True)


_COLUMNS = "account, format, filename, size, sha256, files, skipped, created_at"


def _from_row(row: tuple) -> ArchiveRecord:  # type: ignore[type-arg]
    account, fmt, filename, size, sha256, files, skipped, created_at = row
    return ArchiveRecord(account, fmt, filename, size, sha256, files, tuple(json.loads(skipped)), created_at)


def archive_record(store: StateStore, account: str) -> ArchiveRecord | None:
    rows = store.query(f"SELECT {_COLUMNS} FROM archives WHERE account = ?", (account,))
    return _from_row(rows[0]) if rows else None


def archive_records(store: StateStore) -> list[ArchiveRecord]:
    return [_from_row(row) for row in store.query(f"SELECT {_COLUMNS} FROM archives ORDER BY account")]
