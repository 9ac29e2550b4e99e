"""What several commands share: the inputs, the state dir and its lock, logging, the event loop's child watcher."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from gateway.model.config import Config, default_state_dir, load_config
from gateway.model.errors import InputError, UserError
from gateway.model.tokens import TokenFile, load_tokens
from gateway.web.app import reserved_segments

__all__ = ["run_watching_children", "load_inputs", "resolve_state_dir", "program_exists", "hold_lock", "read_pid",
           "lock_is_held", "setup_logging", "add_log_file", "PID_FILE"]

T = TypeVar("T")

#: In the state dir: the running gateway's pid, locked for its whole run (one gateway per state dir).
PID_FILE = "gateway.pid"


def run_watching_children(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, with children watched through pidfds.

    Before Python 3.12 asyncio waits for each child in a thread of its own (hundreds of desktops and
    proxies: hundreds of threads); a pidfd watcher needs none. The process's previous watcher is put
    back afterwards, so code that runs later in the same process (a test calling ``main()``, then
    Playwright) finds asyncio as it was.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return asyncio.run(main)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        previous = asyncio.get_child_watcher()
    try:
        return asyncio.run(_with_pidfd_watcher(main))
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(previous)


async def _with_pidfd_watcher(main: Coroutine[Any, Any, T]) -> T:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)
    try:
        return await main
    finally:
        watcher.close()


def load_inputs(tokens_path: Path, config_path: Path | None) -> tuple[TokenFile, Config]:
    """Both inputs are read and every problem in either is reported together."""
    problems = []
    tokens = config = None
    try:
        tokens = load_tokens(tokens_path, reserved_routes=reserved_segments())
    except InputError as exc:
        problems += exc.problems
    try:
        config = load_config(config_path)
    except InputError as exc:
        problems += exc.problems
    if problems:
        raise InputError(problems)
    assert tokens is not None and config is not None
    return tokens, config


def resolve_state_dir(option: Path | None, config: Config) -> Path:
    if option is not None:
        return option.resolve()
    if config.state_dir:
        return Path(config.state_dir).expanduser().resolve()
    return default_state_dir()


def program_exists(program: str) -> bool:
    if os.sep in program:
        return os.access(program, os.X_OK)
    return shutil.which(program) is not None


class hold_lock:
    """One gateway per state dir: an exclusive lock on ``gateway.pid`` for the whole run."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PID_FILE
        self.fd = -1

    def __enter__(self) -> "hold_lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                pid = read_pid(self.path)
                raise UserError(f"a gateway is already running with state dir {self.path.parent}"
                                + (f" (pid {pid})" if pid else "") + "; stop it with `gateway down`") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=_LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # asyncssh logs every channel (each remote command of backend: ssh) at INFO.
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if verbose else logging.WARNING)


def add_log_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.getLogger().addHandler(handler)
