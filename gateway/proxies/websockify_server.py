"""``proxy.mode: per-account``'s fork server: websockify imported once, one forked websockify per account.

Starting a websockify process costs a Python interpreter plus websockify and numpy imports: about
0.3 s of CPU and 19 MB of PSS each, so 60 accounts took 20 s to come up on two cores. This module
runs one small server process (``python -m gateway.proxies.websockify_server``) that imports websockify
once and then forks one child per account. Each child is still its own websockify, as if started
from the command line:

* its own PID, in a session and process group of its own (the gateway stops it with
  :func:`gateway.common.proc.terminate_group` and records its :class:`ProcessIdentity`, like before);
* its own log file, and the command line a separate ``python -m websockify`` would have (so ``ps``,
  the tests and an organiser see one websockify per account, with its ports);
* websockify's own server loop (``WebSocketProxy.start_server``), which forks one child per
  connection exactly as the command-line websockify does;
* killing it (even with SIGKILL) affects that account only: the fork server reports the exit and
  the gateway restarts that account's proxy through it.

Forked children share the parent's pages copy-on-write, so each costs only what it writes.

The gateway talks to the server over its stdin and stdout, one JSON object per line:
``{"id": N, "spec": {...}}`` asks for a child and is answered ``{"id": N, "pid": PID}`` (or
``"error"``); ``{"exited": PID, "status": CODE}`` is sent when a child ends. The server exits when
its stdin closes (the gateway stopped or died); children it already forked keep running, as
separate websockify processes would, until the gateway (or the next one, from its records) stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import select
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateway.common.proc import stat_fields

__all__ = ["ProxySpec", "ForkServer", "ForkedProcess", "ForkServerError", "set_title"]

log = logging.getLogger("gateway.websockify_server")

#: Room for the children's command lines: a child can only rewrite its title inside the memory the
#: kernel gave the server's own argv, so the server is started with this many spaces as its last
#: argument (a websockify command line with a long remote host name fits).
TITLE_ROOM = 512
#: A child that could not become websockify at all exits with this status (EX_SOFTWARE).
SETUP_FAILED = 70
#: The status reported for a child whose exit the gateway saw but whose parent could not report it.
UNKNOWN_STATUS = 255


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """One account's websockify: what it listens on, where it relays to, and its log."""

    listen_port: int
    target_host: str
    target_port: int
    heartbeat_s: int
    log_path: str
    #: The command line the child shows, as a separate ``python -m websockify`` would.
    title: tuple[str, ...] = ()
    #: A websocket not VNC-authenticated by then is closed (gateway.proxies.websockify_deadline); 0: never.
    auth_timeout_s: float = 0.0

    @classmethod
    def from_json(cls, data: dict) -> ProxySpec:
        return cls(int(data["listen_port"]), str(data["target_host"]), int(data["target_port"]),
                   int(data["heartbeat_s"]), str(data["log_path"]), tuple(str(a) for a in data.get("title", ())),
                   float(data.get("auth_timeout_s", 0.0)))


# -- the server process ------------------------------------------------------------------------


def set_title(argv: Sequence[str]) -> bool:
    """Make /proc/self/cmdline show ``argv``: rewrite the process's own argv memory in place.

    The kernel reads the command line from [arg_start, arg_end) of the process's memory (fields 48
    and 49 of /proc/self/stat); the rest is filled with NULs. False (nothing changed) if it does
    not fit.
    """
    fields = stat_fields("self")
    assert fields is not None  # this process exists
    start, end = int(fields[45]), int(fields[46])
    title = b"\0".join(a.encode() for a in argv) + b"\0"
    if not start or len(title) > end - start:
        return False
    ctypes.memmove(start, title + b"\0" * (end - start - len(title)), end - start)
    return True


def _redirect_output(log_path: str) -> None:
    """stdin from /dev/null, stdout and stderr appended to the account's log (as spawn() does)."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _run_websockify(spec: ProxySpec) -> int:
    """In the forked child: websockify's own server loop, as its command line would run it."""
    import multiprocessing

    from websockify import websocketproxy

    from gateway.proxies.websockify_deadline import deadline_handler

    # The command-line websockify logs its messages bare to stderr; so does this one (to its log).
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # websockify forks a child per connection with multiprocessing; only "fork" keeps the
    # accepted socket usable in it (websockify issue #643 with forkserver).
    multiprocessing.set_start_method("fork", force=True)
    handler = deadline_handler(spec.auth_timeout_s) if spec.auth_timeout_s else websocketproxy.ProxyRequestHandler
    server = websocketproxy.WebSocketProxy(
        RequestHandlerClass=handler, listen_host="127.0.0.1", listen_port=spec.listen_port,
        target_host=spec.target_host, target_port=spec.target_port,
        heartbeat=spec.heartbeat_s, cert="self.pem",  # the command line's defaults
        ssl_options=websocketproxy.select_ssl_version("default"))
    try:
        server.start_server()
    except SystemExit as exc:  # websockify exits this way, e.g. when its port is taken
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return 0


def _become_websockify(spec: ProxySpec, keep_closed: Sequence[int]) -> None:
    """The forked child's whole life; never returns."""
    status = SETUP_FAILED
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in keep_closed:
            with contextlib.suppress(OSError):
                os.close(fd)
        _redirect_output(spec.log_path)
        if spec.title:
            set_title(spec.title)
        status = _run_websockify(spec)
    except BaseException:  # noqa: BLE001 - reported in the account's log, then the exit status
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _fork(spec: ProxySpec, keep_closed: Sequence[int]) -> int:
    """Fork one websockify; return its pid once it leads a session of its own.

    The gateway signals the child's process group (pgid = pid), so that group must exist before
    the pid is handed out: the child closes ``ready`` after setsid(), and the parent waits for it.
    """
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.close(ready_r)
            os.close(ready_w)
        except BaseException:  # noqa: BLE001 - never run on as a second fork server
            os._exit(SETUP_FAILED)
        _become_websockify(spec, keep_closed)
    os.close(ready_w)
    os.read(ready_r, 1)  # EOF: the child has its own session (or has died trying)
    os.close(ready_r)
    return pid


@dataclass
class _Server:
    """The fork server's loop: requests on stdin, answers and exit reports on stdout."""

    wake_r: int
    wake_w: int
    pending: bytes = b""
    children: set[int] = field(default_factory=set)

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(1, data):]

    def handle(self, line: bytes) -> None:
        request = json.loads(line)
        try:
            pid = _fork(ProxySpec.from_json(request["spec"]), (self.wake_r, self.wake_w))
        except OSError as exc:
            self.send({"id": request["id"], "error": str(exc)})
            return
        self.children.add(pid)
        self.send({"id": request["id"], "pid": pid})

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"exited": pid, "status": os.waitstatus_to_exitcode(status)})

    def read_requests(self) -> bool:
        """Handle every whole line now readable; False once stdin closed."""
        data = os.read(0, 65536)
        if not data:
            return False
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            if line.strip():
                self.handle(line)
        return True

    def run(self) -> None:
        while True:
            try:
                readable, _, _ = select.select([0, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 512):
                        pass
            self.reap()
            if 0 in readable and not self.read_requests():
                return


def serve() -> None:
    """The server process: import websockify once, then fork one child per request until stdin closes."""
    # Imported here, before any fork, so that every child shares these pages instead of importing again.
    import multiprocessing  # noqa: F401

    from websockify import websocketproxy  # noqa: F401

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    # A handler (not SIG_IGN, which would let the kernel reap them unseen) so each exit wakes select.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Objects that exist now are never collected: the collector then does not touch (and so does
    # not copy) the shared pages in every child.
    gc.collect()
    gc.freeze()
    _Server(wake_r, wake_w).run()


# -- the gateway's side ------------------------------------------------------------------------


class ForkServerError(Exception):
    pass


class ForkedProcess:
    """A websockify the fork server made, as the gateway sees it (like an asyncio subprocess).

    ``returncode`` is None while it runs. Its exit is learned from the fork server's report, or,
    should the fork server itself be gone, from a pidfd (then the status is unknown: 255).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = asyncio.get_running_loop().create_future()
        self._gone = False  # the pidfd said it exited; waiting for the status
        self._pidfd: int | None = None
        self._watch()

    def _watch(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (OSError, AttributeError):
            return  # already gone (the report follows) or no pidfd on this kernel
        asyncio.get_running_loop().add_reader(self._pidfd, self._pidfd_ready)

    def _pidfd_ready(self) -> None:
        self._unwatch()
        self._gone = True

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def exited(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
            self._unwatch()
            self._done.set_result(status)

    def orphaned(self) -> None:
        """The fork server is gone: from now on, the pidfd alone tells when this one ends."""
        if self._gone:
            self.exited(UNKNOWN_STATUS)
        elif self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            asyncio.get_running_loop().add_reader(self._pidfd, self._orphan_exited)

    def _orphan_exited(self) -> None:
        self.exited(UNKNOWN_STATUS)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)


class ForkServer:
    """The gateway's handle on one fork server process; started on first use, again if it died."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._requests: dict[int, asyncio.Future[int]] = {}
        self._children: dict[int, ForkedProcess] = {}
        #: Exits reported before fork() registered the child (it died at once).
        self._early_exits: dict[int, int] = {}
        self._next_id = 0
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None and self._reader is not None

    def live_children(self) -> int:
        return sum(1 for child in self._children.values() if child.returncode is None)

    async def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab", buffering=0) as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.proxies.websockify_server", " " * TITLE_ROOM,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                start_new_session=True)  # a terminal's Ctrl+C is the gateway's to handle
        self._reader = asyncio.create_task(self._read(self.process))
        log.info("websockify fork server started pid=%d", self.process.pid)

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            message = json.loads(line)
            if "exited" in message:
                child = self._children.pop(int(message["exited"]), None)
                if child is not None:
                    child.exited(int(message["status"]))
                else:
                    self._early_exits[int(message["exited"])] = int(message["status"])
                continue
            future = self._requests.pop(int(message["id"]), None)
            if future is not None and not future.done():
                if "pid" in message:
                    future.set_result(int(message["pid"]))
                else:
                    future.set_exception(ForkServerError(message.get("error", "fork failed")))
        self._lost()

    def _lost(self) -> None:
        """The server's stdout closed: it exited. Pending requests fail; children are watched alone."""
        if self._reader is asyncio.current_task():
            self._reader = None
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ForkServerError("the websockify fork server exited"))
        self._requests.clear()
        for child in self._children.values():
            child.orphaned()
        self._children.clear()

    async def fork(self, spec: ProxySpec) -> ForkedProcess:
        """A new websockify child for ``spec``; returns once its pid is known (not yet listening)."""
        async with self._lock:  # one (re)start of the server at a time
            if not self.running:
                await self._start()
            assert self.process is not None and self.process.stdin is not None
            self._next_id += 1
            request_id = self._next_id
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._requests[request_id] = future
            self.process.stdin.write((json.dumps({"id": request_id, "spec": asdict(spec)}) + "\n").encode())
        pid = await future
        child = ForkedProcess(pid)
        if pid in self._early_exits:
            child.exited(self._early_exits.pop(pid))
        else:
            self._children[pid] = child
            if not self.running:  # the server went between its answer and now
                self._children.pop(pid)
                child.orphaned()
        return child

    async def close(self) -> None:
        """Stop the server (its stdin closes; children it forked are not touched)."""
        process, reader = self.process, self._reader
        if process is None:
            return
        self.process = None
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        if reader is not None:
            await reader


if __name__ == "__main__":
    serve()
