"""Packing workspaces that live on SSH hosts (backend: ssh), read over SFTP (asyncssh) as they are packed.

The walk and the reads happen as the archive is written: each directory is listed, each file opened
and read in 1 MiB pieces straight into the compressor, so nothing of the tree is copied to the
gateway first. It logs in the way the desktops do (``ssh.user``, or each account's own user with
``"{account}"``, so a workspace is read as its owner) and checks the host key the same way. Links are
stored as links (never followed), special files are skipped and listed, and the SHA-256 is recorded,
as for local workspaces (gateway/model/archive.py, whose writer runs in a worker thread and asks the event
loop for each SFTP reply).
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import stat
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from gateway.model.archive import (CHUNK_BYTES, FORMATS, ArchiveEntry, PackResult, archives_dir, pack_entries,
                                   record_archive, special_kind)
from gateway.backends.base import BackendError
from gateway.model.config import Config
from gateway.common.files import ensure_private_dir
from gateway.model.state import StateStore
from gateway.model.tokens import Account

__all__ = ["pack_remote_accounts"]

log = logging.getLogger("gateway.archive")

T = TypeVar("T")


def _stat(attrs: asyncssh.SFTPAttrs) -> os.stat_result:
    mtime = float(attrs.mtime or 0)
    return os.stat_result((attrs.permissions or 0, 0, 0, 1, attrs.uid or 0, attrs.gid or 0, attrs.size or 0,
                           float(attrs.atime or mtime), mtime, mtime))


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


class _RemoteTree:
    """A workspace on a host, walked from a worker thread; every SFTP call runs on the event loop."""

    def __init__(self, sftp: asyncssh.SFTPClient, loop: asyncio.AbstractEventLoop) -> None:
        self.sftp = sftp
        self.loop = loop

    def call(self, awaitable: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop).result()

    def entries(self, root: str, root_name: str, skipped: list[str]) -> Iterator[ArchiveEntry]:
        attrs = self.call(self.sftp.lstat(root))
        if not stat.S_ISDIR(attrs.permissions or 0):
            raise NotADirectoryError(f"{root} is not a directory (a link is never followed)")
        yield ArchiveEntry("dir", root_name, _stat(attrs))
        yield from self._walk(root, root_name, skipped)

    def _walk(self, path: str, prefix: str, skipped: list[str]) -> Iterator[ArchiveEntry]:
        listing = sorted((n for n in self.call(self.sftp.readdir(path)) if n.filename not in (".", "..")),
                         key=lambda n: n.filename)
        for name in listing:
            remote, inside = posixpath.join(path, str(name.filename)), f"{prefix}/{name.filename}"
            try:
                attrs = name.attrs if name.attrs.permissions is not None else self.call(self.sftp.lstat(remote))
                mode = attrs.permissions or 0
                if stat.S_ISLNK(mode):
                    yield ArchiveEntry("link", inside, _stat(attrs), target=str(self.call(self.sftp.readlink(remote))))
                elif stat.S_ISDIR(mode):
                    yield ArchiveEntry("dir", inside, _stat(attrs))
                    yield from self._walk(remote, inside, skipped)
                elif stat.S_ISREG(mode):
                    yield from self._file(remote, inside, attrs)
                else:
                    kind = special_kind(mode)
                    skipped.append(f"{inside}: {kind}")
            except asyncssh.SFTPNoSuchFile:
                skipped.append(f"{inside}: removed while packing")
            except (asyncssh.SFTPError, OSError) as exc:
                skipped.append(f"{inside}: {getattr(exc, 'reason', None) or exc}")

    def _file(self, remote: str, inside: str, attrs: asyncssh.SFTPAttrs) -> Iterator[ArchiveEntry]:
        handle = self.call(self.sftp.open(remote, "rb", block_size=CHUNK_BYTES))
        try:
            st = _stat(self.call(handle.stat()))
            if not stat.S_ISREG(st.st_mode):  # swapped for something else since it was listed
                return
            yield ArchiveEntry("file", inside, st, read=lambda n: self.call(handle.read(n)))
        finally:
            self.call(handle.close())


async def _pack_one(backend: Any, account: Account, destination: Path, *, fmt: str, level: int) -> PackResult:
    sftp, workspace = await backend.workspace_sftp(account)
    try:
        tree = _RemoteTree(sftp, asyncio.get_running_loop())
        return await asyncio.to_thread(pack_entries, lambda skipped: tree.entries(workspace, account.id, skipped),
                                       destination, fmt=fmt, level=level)
    finally:
        sftp.exit()


async def pack_remote_accounts(store: StateStore, accounts: Sequence[Account], *, config: Config, state_dir: Path,
                               fmt: str, level: int = 6, concurrency: int = 4) -> dict[str, PackResult | str]:
    """Pack each SSH account's workspace from its host; per account its result or why it has none."""
    from gateway.backends.ssh import SshBackend

    directory = ensure_private_dir(archives_dir(state_dir))
    backend = SshBackend(config, state_dir)
    limit = asyncio.Semaphore(concurrency)
    results: dict[str, PackResult | str] = {}

    async def pack(account: Account) -> None:
        async with limit:
            try:
                result = await _pack_one(backend, account, directory / f"{account.id}{FORMATS[fmt]}",
                                         fmt=fmt, level=level)
            except (BackendError, asyncssh.Error, OSError) as exc:
                why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                results[account.id] = f"cannot pack its workspace on {account.vnc_host}: {why}"
                return
            record_archive(store, account.id, fmt, result)
            results[account.id] = result
            log.info("remote workspace packed account=%s host=%s bytes=%d", account.id, account.vnc_host, result.size)

    try:
        async with asyncio.TaskGroup() as group:
            for account in accounts:
                group.create_task(pack(account), name=f"archive:{account.id}")
    finally:
        await backend.close(final=False)
    return results
