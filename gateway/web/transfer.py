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

The account's user is found the way the local backend finds it (``desktop.users``: ``create``,
``existing`` or ``gateway``), never root: when it can't be found the request is refused, since
writing as root would leave the participant files it can't touch and list none of its own.

The quota counts every byte an account has uploaded during the event, in a counter file per account
(``STATE_DIR/uploads/ACCOUNT.bytes``), not the files in ``~/Uploads``: moving them out of the folder
must not make room for more, or one participant could fill the disk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import re
import secrets
import stat
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from gateway.backends.desktop_users import account_workspace, uid_min, user_name_for
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.model.config import Config
from gateway.model.status import DesktopSlot
from gateway.web.context import SLOTS
from gateway.web.sessions import session_account

__all__ = ["TRANSFER", "TransferRefused", "Transfers", "add_transfer_routes", "safe_name"]

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
    """The Unix user (and group) a desktop's files belong to."""

    uid: int
    gid: int


@dataclass
class Transfers:
    config: Config
    state_dir: Path
    #: Bytes being uploaded now, per account (the quota counts them before they land).
    in_flight: dict[str, int] = field(default_factory=dict)

    def owner(self, account: str) -> Owner:
        """The user ``account``'s desktop runs as, found as the local backend finds it (``desktop.users``),
        or TransferRefused (503): never root, whose files the participant could not touch."""
        name = user_name_for(account, self.config)
        # desktop.users: gateway runs desktops as the gateway's user (refused at start when that is root).
        owner = Owner(os.geteuid(), os.getegid()) if name is None else _named_user(account, name)
        if owner.uid == 0:
            log.error("file transfer refused: account=%s would write and list files as root", account)
            raise TransferRefused(503, _NO_USER_OF_ITS_OWN)
        return owner

    def home(self, account: str) -> Path:
        return account_workspace(account, self.config, self.state_dir)

    @property
    def max_file(self) -> int:
        return int(self.config.transfer.max_file_mb * 1_000_000)

    @property
    def quota(self) -> int:
        return int(self.config.transfer.quota_mb * 1_000_000)


TRANSFER = web.AppKey("transfer", Transfers)
_NO_USER_OF_ITS_OWN = "Files can't be moved for this desktop: it has no user of its own. Tell the organisers."


def _named_user(account: str, name: str) -> Owner:
    """The user ``name`` (made for the event, or the lab's), or TransferRefused (503): it is gone, or is
    a system account, which the start-up check refuses too."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        log.error("file transfer refused: account=%s has no user %r", account, name)
        raise TransferRefused(503, "Your desktop's user does not exist on this machine, so files can't be "
                                   "moved. Tell the organisers.") from None
    if entry.pw_uid < uid_min():  # root included
        log.error("file transfer refused: account=%s: user %r is a system account", account, name)
        raise TransferRefused(503, _NO_USER_OF_ITS_OWN)
    return Owner(entry.pw_uid, entry.pw_gid)


# -- the quota: bytes uploaded per account during the event ----------------------------------------------


def _counter_path(t: Transfers, account: str) -> Path:
    # Account ids are checked when the tokens are read ([A-Za-z0-9_-][A-Za-z0-9._-]*): a plain name.
    return t.state_dir / "uploads" / f"{account}.bytes"


def _uploaded(t: Transfers, account: str) -> int:
    """Bytes ``account`` has uploaded so far in the event (0 before its first upload)."""
    try:
        return int(_counter_path(t, account).read_text())
    except FileNotFoundError:
        return 0


def _count_upload(t: Transfers, account: str, size: int) -> None:
    """Add ``size`` to the account's counter. Handlers run on one event loop and nothing awaits
    between this read and write, so two uploads of one account can't lose each other's bytes."""
    ensure_private_dir(_counter_path(t, account).parent)
    atomic_write(_counter_path(t, account), f"{_uploaded(t, account) + size}\n", mode=0o600)


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


async def list_files(request: web.Request) -> web.Response:
    t, slot = _participant(request)
    files: list[dict[str, object]] = []
    try:
        owner = t.owner(slot.account.id)
        with open_folder(t.home(slot.account.id), t.config.transfer.download_dir) as folder:
            files = [{"name": name, "size": info.st_size, "modified": int(info.st_mtime)}
                     for name, info in sorted(_regular_files(folder, owner), key=lambda f: -f[1].st_mtime)]
    except TransferRefused as exc:
        if exc.status != 404:
            return _refusal(exc)
    return web.json_response({
        "files": files, "upload_dir": t.config.transfer.upload_dir, "download_dir": t.config.transfer.download_dir,
        "used": _uploaded(t, slot.account.id), "quota": t.quota, "max_file": t.max_file,
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
        _check_quota(t, account, size)
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


def _check_quota(t: Transfers, account: str, size: int) -> None:
    """TransferRefused (413) when ``size`` more bytes would pass the account's quota for the event."""
    left = max(0, t.quota - _uploaded(t, account) - t.in_flight.get(account, 0))
    if size <= left:
        return
    if left == 0:
        raise TransferRefused(413, f"Your upload quota for the event ({_mb(t.quota)}) is used up; "
                                   "files moved or deleted since do not count back.")
    raise TransferRefused(413, f"This file ({_mb(size, floor=False)}) is larger than what is left of your "
                               f"upload quota for the event: {_mb(left)} of {_mb(t.quota)}.")


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
            # Counted before it gets its name: a failure after this over-counts, never lets bytes in free.
            _count_upload(t, account, size)
            return _give_name(folder, temporary, name)
        finally:
            os.close(fd)
            os.unlink(temporary, dir_fd=folder)


def _mb(size: int, *, floor: bool = True) -> str:
    """``size`` in MB (KB below 1 MB) to one decimal, like the page shows sizes; rounded down unless
    ``floor`` is False, so that what is left is never overstated and a file never looks smaller."""
    unit, scale = ("MB", 1_000_000) if size >= 1_000_000 else ("KB", 1_000)
    tenths = size * 10 // scale if floor else -(-size * 10 // scale)
    return f"{tenths / 10:g} {unit}"


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
