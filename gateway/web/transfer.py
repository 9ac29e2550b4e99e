"""Files in and out of a local desktop, from the viewer: uploads into ``~/Uploads``, downloads from
``~/Downloads`` (``transfer:`` in the config). Nothing to install, no SSH.

Routes (relative to the gateway root; each needs the participant's session for that very account):

- ``GET /files/<account>/``: the download folder's files (name, size) and the upload quota;
- ``PUT /files/<account>/uploads/<name>``: the request body becomes ``~/Uploads/<name>`` (a new file;
  an existing name gets `` (1)``, `` (2)``... rather than being overwritten);
- ``GET /files/<account>/downloads/<name>``: that file, with Range support (resumable).

The gateway runs as root and the folders belong to the participant, who may plant symlinks or hard
links there to make root read or write elsewhere. So every path is walked one component at a time
from the home with ``O_NOFOLLOW`` relative to the parent's descriptor (a link anywhere is refused),
new files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and handed to the account's user with
``fchown`` before they get their name, and a file is served only from the descriptor that was
checked: a regular file owned by the account's user (a hard link to a root file is not).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import stat
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from gateway.model.config import Config
from gateway.backends.desktop_users import account_workspace, recorded_users
from gateway.model.status import DesktopSlot
from gateway.web.context import SLOTS
from gateway.web.sessions import session_account

__all__ = ["TRANSFER", "Transfers", "add_transfer_routes", "TransferRefused", "safe_name"]

log = logging.getLogger("gateway.transfer")

CHUNK = 256 * 1024
MAX_NAME_BYTES = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Characters a file name may not hold: path separators, NUL, control characters, bidi overrides.
_BAD_NAME_RE = re.compile("[/\\\\\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class TransferRefused(Exception):
    """A request the participant can fix or must not make; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Owner:
    uid: int
    gid: int


@dataclass
class Transfers:
    config: Config
    state_dir: Path
    #: Bytes being uploaded now, per account (the quota counts them before they land).
    in_flight: dict[str, int] = field(default_factory=dict)

    def owner(self, account: str) -> Owner:
        user = recorded_users(self.state_dir).get(account)
        return Owner(user.uid, user.gid) if user else Owner(os.geteuid(), os.getegid())

    def home(self, account: str) -> Path:
        return account_workspace(account, self.config, self.state_dir)

    @property
    def max_file(self) -> int:
        return int(self.config.transfer.max_file_mb * 1_000_000)

    @property
    def quota(self) -> int:
        return int(self.config.transfer.quota_mb * 1_000_000)


TRANSFER = web.AppKey("transfer", Transfers)


# -- names and folders ---------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A file name as typed by the participant's browser, or TransferRefused (400)."""
    name = name.strip()
    if not name or name in (".", "..") or name.startswith(".") or _BAD_NAME_RE.search(name):
        raise TransferRefused(400, "That file name cannot be used: no slashes, control characters or leading dot.")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise TransferRefused(400, f"The file name is too long (at most {MAX_NAME_BYTES} bytes).")
    return name


@contextmanager
def open_folder(home: Path, relative: str, *, create: Owner | None = None) -> Iterator[int]:
    """A descriptor of ``home/relative``, walked one component at a time without following links.

    ``create``: make missing folders (0755, handed to that owner). A link or a non-folder anywhere
    on the way is refused (403): the participant controls everything below the home."""
    fds = []
    try:
        fds.append(os.open(home, _DIR_FLAGS))
        for part in relative.split("/"):
            try:
                fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
            except FileNotFoundError:
                if create is None:
                    raise TransferRefused(404, f"~/{relative} does not exist yet.") from None
                os.mkdir(part, 0o755, dir_fd=fds[-1])
                fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
                os.fchown(fds[-1], create.uid, create.gid)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TransferRefused(403, f"~/{relative} is not a plain folder (a link?); refused.") from None
                raise
        yield fds[-1]
    except FileNotFoundError:
        raise TransferRefused(404, "The desktop's home folder does not exist.") from None
    finally:
        for fd in fds:
            os.close(fd)


def _regular_files(folder: int, owner: Owner) -> Iterator[tuple[str, os.stat_result]]:
    """The folder's regular files owned by ``owner`` (links, folders and others' files left out)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            info = os.stat(entry.name, dir_fd=folder, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_uid == owner.uid:
                yield entry.name, info


# -- access ---------------------------------------------------------------------------------------------


def _participant(request: web.Request) -> tuple[Transfers, DesktopSlot]:
    """The request's own account (from its session), or an HTTP error: files are nobody else's."""
    wanted = request.match_info["account"]
    slot = session_account(request)
    if slot is None:
        raise web.HTTPUnauthorized(text="Sign in first: files need your session.")
    if slot.account.id != wanted or wanted not in request.app[SLOTS]:
        log.warning("file transfer refused: account=%s asked for another account's files", slot.account.id)
        raise web.HTTPForbidden(text="These are not your files.")
    if slot.backend != "local" or slot.protocol != "vnc":
        raise web.HTTPNotFound(text="Files can be moved only for desktops on this machine.")
    return request.app[TRANSFER], slot


def _refusal(exc: TransferRefused) -> web.Response:
    return web.json_response({"error": str(exc)}, status=exc.status, headers={"Cache-Control": "no-store"})


# -- listing ---------------------------------------------------------------------------------------------


def _used(t: Transfers, account: str, owner: Owner) -> int:
    try:
        with open_folder(t.home(account), t.config.transfer.upload_dir) as folder:
            return sum(info.st_size for _, info in _regular_files(folder, owner))
    except TransferRefused:
        return 0


async def list_files(request: web.Request) -> web.Response:
    t, slot = _participant(request)
    owner = t.owner(slot.account.id)
    files: list[dict[str, object]] = []
    try:
        with open_folder(t.home(slot.account.id), t.config.transfer.download_dir) as folder:
            files = [{"name": name, "size": info.st_size, "modified": int(info.st_mtime)}
                     for name, info in sorted(_regular_files(folder, owner), key=lambda f: -f[1].st_mtime)]
    except TransferRefused as exc:
        if exc.status != 404:
            return _refusal(exc)
    return web.json_response({
        "files": files, "upload_dir": t.config.transfer.upload_dir, "download_dir": t.config.transfer.download_dir,
        "used": _used(t, slot.account.id, owner), "quota": t.quota, "max_file": t.max_file,
    }, headers={"Cache-Control": "no-store"})


# -- upload ----------------------------------------------------------------------------------------------


def _create_new(folder: int, owner: Owner) -> tuple[int, str]:
    """A new, empty, hidden file in ``folder`` (never an existing one, never through a link), owned by
    ``owner`` from the start; returns its descriptor and name."""
    temporary = f".upload-{secrets.token_hex(8)}.part"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=folder)
    os.fchown(fd, owner.uid, owner.gid)
    return fd, temporary


def _give_name(folder: int, temporary: str, name: str) -> str:
    """Link the finished upload under ``name`` (or ``name (N)``: an existing file is never replaced)."""
    stem, dot, suffix = name.rpartition(".") if "." in name[1:] else (name, "", "")
    for n in range(1000):
        candidate = name if n == 0 else f"{stem} ({n}){dot}{suffix}"
        try:
            os.link(temporary, candidate, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
            return candidate
        except FileExistsError:
            continue
    raise TransferRefused(409, "Too many files with that name; rename it and try again.")


async def upload(request: web.Request) -> web.Response:
    t, slot = _participant(request)
    account = slot.account.id
    try:
        name = safe_name(urllib.parse.unquote(request.match_info["name"]))
        size = request.content_length
        if size is None:
            raise TransferRefused(411, "The upload must say its size (Content-Length).")
        if size > t.max_file:
            raise TransferRefused(413, f"The file is larger than {_mb(t.max_file)}, the largest the event allows.")
        owner = t.owner(account)
        if _used(t, account, owner) + t.in_flight.get(account, 0) + size > t.quota:
            raise TransferRefused(413, f"Your uploads would pass {_mb(t.quota)}, your quota; "
                                       f"delete files from ~/{t.config.transfer.upload_dir} first.")
    except TransferRefused as exc:
        return _refusal(exc)
    t.in_flight[account] = t.in_flight.get(account, 0) + size
    try:
        final = await _receive(request, t, account, owner, name, size)
    except TransferRefused as exc:
        return _refusal(exc)
    finally:
        t.in_flight[account] -= size
    log.info("upload account=%s bytes=%d", account, size)
    return web.json_response({"name": final, "size": size, "folder": t.config.transfer.upload_dir},
                             status=201, headers={"Cache-Control": "no-store"})


async def _receive(request: web.Request, t: Transfers, account: str, owner: Owner, name: str, size: int) -> str:
    with open_folder(t.home(account), t.config.transfer.upload_dir, create=owner) as folder:
        fd, temporary = _create_new(folder, owner)
        received = 0
        try:
            while chunk := await request.content.read(CHUNK):
                received += len(chunk)
                if received > size:
                    raise TransferRefused(400, "The upload was longer than it said.")
                await asyncio.get_running_loop().run_in_executor(None, os.write, fd, chunk)
            if received != size:
                raise TransferRefused(400, "The upload was cut off; try again.")
            os.fsync(fd)
            return _give_name(folder, temporary, name)
        finally:
            os.close(fd)
            os.unlink(temporary, dir_fd=folder)


def _mb(size: int) -> str:
    return f"{size / 1_000_000:g} MB"


# -- download ----------------------------------------------------------------------------------------------


def _open_download(t: Transfers, account: str, name: str) -> tuple[int, os.stat_result]:
    owner = t.owner(account)
    with open_folder(t.home(account), t.config.transfer.download_dir) as folder:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder)
        except FileNotFoundError:
            raise TransferRefused(404, "No such file in your downloads folder.") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TransferRefused(403, "That is a link; only files inside your downloads folder are offered.") from None
            raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != owner.uid:
        os.close(fd)
        raise TransferRefused(403, "Only your own plain files are offered for download.")
    return fd, info


def _byte_range(request: web.Request, size: int, etag: str) -> tuple[int, int] | None:
    """(start, stop) asked for with Range (None: the whole file); TransferRefused(416) if unsatisfiable."""
    if "Range" not in request.headers or request.headers.get("If-Range", etag) != etag:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        return None
    start, stop = wanted.start, wanted.stop
    if start is None and stop is None:
        return None
    if start is None or start < 0:
        start = max(0, size + (start if start is not None else -(stop or 0)))
        stop = size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise TransferRefused(416, "That part of the file does not exist.")
    return start, stop


async def download(request: web.Request) -> web.StreamResponse:
    t, slot = _participant(request)
    try:
        name = safe_name(urllib.parse.unquote(request.match_info["name"]))
        fd, info = _open_download(t, slot.account.id, name)
    except TransferRefused as exc:
        if exc.status == 403:
            log.warning("download refused account=%s: %s", slot.account.id, exc)
        return _refusal(exc)
    try:
        etag = f'"{info.st_ino:x}-{info.st_size:x}-{int(info.st_mtime_ns):x}"'
        try:
            part = _byte_range(request, info.st_size, etag)
        except TransferRefused as exc:
            return web.Response(status=416, text=str(exc), headers={"Content-Range": f"bytes */{info.st_size}"})
        start, stop = part or (0, info.st_size)
        response = web.StreamResponse(status=206 if part else 200, headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"attachment; filename*=UTF-8''{urllib.parse.quote(name)}",
            "Accept-Ranges": "bytes", "ETag": etag, "Cache-Control": "private, no-store",
            "Content-Length": str(stop - start),
        })
        if part:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{info.st_size}"
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        offset = start
        while offset < stop:
            chunk = await loop.run_in_executor(None, os.pread, fd, min(CHUNK, stop - offset), offset)
            if not chunk:
                break  # the file shrank meanwhile
            await response.write(chunk)
            offset += len(chunk)
        await response.write_eof()
        if start == 0:
            log.info("download account=%s bytes=%d", slot.account.id, stop - start)
        return response
    finally:
        os.close(fd)


def add_transfer_routes(app: web.Application) -> None:
    """The file routes, when ``transfer.enabled`` (see the module docstring; the app needs :data:`TRANSFER`)."""
    app.router.add_get("/files/{account}/", list_files)
    app.router.add_put("/files/{account}/uploads/{name}", upload)
    app.router.add_get("/files/{account}/downloads/{name}", download)
