"""A bad network for tests and benchmarks: a network namespace of our own, joined to the host by a veth pair.

This kernel has no ``sch_netem`` (and no iptables/nft, no tc classifiers), so the link is built from
what it does have:

* **bandwidth** is real: a ``tbf`` qdisc on both ends of the veth pair (``shape(rate)``);
* **a cut** is real packet loss in the kernel, both ways, with both links still up (no "offline" event
  for the browser, as when Wi-Fi stops passing packets): ``tbf`` with a 40-byte bucket, which drops every
  frame longer than that, i.e. every IP packet (``cut()``; ``mend()`` puts the shaping back);
* **delay and random loss** are approximated in user space by :class:`ImpairedRelay`, a TCP relay on
  the host side that holds every byte for ``delay_s`` in each direction and, for a "lost" 1448-byte
  segment (probability ``loss``), stalls that direction for a retransmission (``stall_s``): what TCP
  makes of a lost packet. The relay is also how the namespace reaches the gateway, which listens on
  127.0.0.1 only (as in the tests): the relay's socket to the browser plays the gateway's socket.

Processes run in the namespace with ``ip netns exec`` (:meth:`Link.chromium_wrapper` for Playwright,
which talks to the browser over inherited pipes); Python code runs there in a thread that joined the
namespace (:func:`run_in_namespace`). Everything is removed on exit, also after a failure: processes
in the namespace, the namespace, the veth pair. Names carry the creating pid, so a namespace left by a
killed test run is recognised and removed by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

__all__ = ["SEGMENT", "ImpairedRelay", "Link", "namespace_link", "run_in_namespace"]

T = TypeVar("T")

PREFIX = "wgnet"
#: 10.231.0.0/16 is this project's test range; each namespace gets a /30 of it, chosen by pid.
SUBNET_BASE = (10, 231)
#: What TCP puts in one segment on a 1500-byte link.
SEGMENT = 1448
#: A tbf bucket smaller than any IP packet: everything is dropped, silently, in both directions.
CUT_QDISC = ["tbf", "rate", "8kbit", "burst", "40", "limit", "40"]
CLONE_NEWNET = 0x40000000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15, check=check)


def _tc(*args: str, netns: str | None = None) -> None:
    """tc in namespace ``netns``, or in this process's own (also when called from a thread that joined
    another namespace: see run_in_namespace)."""
    if netns is None:
        argv = ["nsenter", f"--net=/proc/{os.getpid()}/ns/net", "tc", *args]
    else:
        argv = ["ip", "netns", "exec", netns, "tc", *args]
    subprocess.run(argv, capture_output=True, text=True, timeout=15, check=True)


@dataclass
class Link:
    """Namespace ``name`` with ``ns_address`` on its end of a veth pair; the host's end has ``host_address``."""

    name: str
    host_dev: str
    ns_dev: str
    host_address: str
    ns_address: str
    rate: str | None = None
    state: str = field(default="up", init=False)  # up | cut

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def _set_root_qdisc(self, qdisc: list[str] | None) -> None:
        for dev, netns in ((self.host_dev, None), (self.ns_dev, self.name)):
            if qdisc is None:
                with contextlib.suppress(subprocess.CalledProcessError):
                    _tc("qdisc", "del", "dev", dev, "root", netns=netns)
            else:
                _tc("qdisc", "replace", "dev", dev, "root", *qdisc, netns=netns)

    def shape(self, rate: str | None) -> None:
        """``rate`` (tc syntax, e.g. ``2mbit``) each way from now on; None: as fast as the veth goes."""
        self.rate = rate
        if self.state == "up":
            self._apply_shaping()

    def _apply_shaping(self) -> None:
        if self.rate is None:
            self._set_root_qdisc(None)
        else:  # a bucket of ten packets; up to 300 ms of queue, as a home router would have
            self._set_root_qdisc(["tbf", "rate", self.rate, "burst", "15000", "latency", "300ms"])

    def cut(self) -> None:
        """Every packet is dropped from now on, both ways; the links stay up."""
        self._set_root_qdisc(CUT_QDISC)
        self.state = "cut"

    def mend(self) -> None:
        """Packets pass again (with the shaping, if any)."""
        self._apply_shaping()
        self.state = "up"

    def chromium_wrapper(self, directory: Path, chromium: str = "/usr/bin/chromium") -> Path:
        """A script that runs Chromium in the namespace, for Playwright's ``executable_path``."""
        path = directory / f"chromium-in-{self.name}"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {self.name} {chromium} "$@"\n')
        path.chmod(0o755)
        return path

    def close(self) -> None:
        _remove_namespace(self.name)


def _remove_namespace(name: str) -> None:
    """Kill what runs in namespace ``name``, then delete it (its veth end goes with it, and so the pair)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)
    _ip("link", "del", f"{name}h", check=False)  # in case the namespace never got its end


def _remove_stale_namespaces() -> None:
    """Namespaces of this module whose creating process is gone (a killed test run) are removed."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"({PREFIX}(\d+))\b", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _remove_namespace(match.group(1))


def _subnet(pid: int) -> tuple[str, str]:
    index = pid % 16384  # 16384 /30 subnets in a /16
    third, fourth = divmod(index * 4, 256)
    base = f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}.{third}"
    return f"{base}.{fourth + 1}", f"{base}.{fourth + 2}"


@contextlib.contextmanager
def namespace_link(rate: str | None = None) -> Iterator[Link]:
    """A fresh namespace and veth pair (up, shaped to ``rate``); all of it is gone afterwards."""
    _remove_stale_namespaces()
    name = f"{PREFIX}{os.getpid()}"
    host_address, ns_address = _subnet(os.getpid())
    link = Link(name, f"{name}h", f"{name}n", host_address, ns_address)
    try:
        _ip("netns", "add", name)
        _ip("link", "add", link.host_dev, "type", "veth", "peer", "name", link.ns_dev)
        _ip("link", "set", link.ns_dev, "netns", name)
        _ip("addr", "add", f"{host_address}/30", "dev", link.host_dev)
        _ip("link", "set", link.host_dev, "up")
        for args in (("addr", "add", f"{ns_address}/30", "dev", link.ns_dev), ("link", "set", link.ns_dev, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", name, "ip", *args)
        link.shape(rate)
        yield link
    finally:
        link.close()


def run_in_namespace(link: Link, make: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``make()`` on an event loop of its own, in a thread that joined the namespace:
    every socket it opens is the namespace's."""
    result: Future[T] = Future()

    def thread() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{link.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            result.set_result(asyncio.run(make()))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
            result.set_exception(exc)

    worker = threading.Thread(target=thread, name=f"in-{link.name}", daemon=True)
    worker.start()
    worker.join()
    return result.result()


class ImpairedRelay:
    """TCP relay from ``listen_host`` (an ephemeral port) to ``target``, in a thread of its own.

    Each direction holds its bytes ``delay_s`` and stalls ``stall_s`` for each 1448-byte segment
    "lost" with probability ``loss``; order is kept (later bytes wait behind a stalled one, as TCP's
    in-order delivery makes them). At most ``queue_segments`` wait per direction; beyond that the relay
    stops reading, so the sender feels the link's capacity. A connection ends when either side does.
    """

    def __init__(self, listen_host: str, target: tuple[str, int], *, delay_s: float = 0.0, loss: float = 0.0,
                 stall_s: float = 0.0, queue_segments: int = 256, seed: int = 17) -> None:
        self.listen_host = listen_host
        self.target = target
        self.delay_s = delay_s
        self.loss = loss
        self.stall_s = stall_s
        self.queue_segments = queue_segments
        self.random = random.Random(seed)
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def __enter__(self) -> Self:
        started = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            try:
                server = await asyncio.start_server(self._client, self.listen_host, 0)
            except BaseException as exc:  # noqa: BLE001 - re-raised by __enter__
                failure.append(exc)
                started.set()
                return
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            async with server:
                await self._stopped.wait()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), name="impaired-relay", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _client(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        # Stopping the relay cancels this; it must end normally (Python 3.11's start_server callback
        # logs a cancelled handler as an error).
        with contextlib.suppress(asyncio.CancelledError):
            await self._relay(down_reader, down_writer)

    async def _relay(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            down_writer.close()
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(down_reader, up_writer))
                group.create_task(self._pipe(up_reader, down_writer))
        except* (OSError, _Ended):
            pass
        finally:
            for writer in (up_writer, down_writer):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self.queue_segments)

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        delivery = asyncio.ensure_future(deliver())
        try:
            last_due = 0.0
            while data := await reader.read(65536):
                for start in range(0, len(data), SEGMENT):
                    due = loop.time() + self.delay_s
                    if self.loss and self.random.random() < self.loss:
                        due += self.stall_s
                    last_due = max(last_due, due)
                    await queue.put((last_due, data[start:start + SEGMENT]))
            await queue.put(None)
            await delivery
        finally:
            delivery.cancel()
        raise _Ended


class _Ended(Exception):
    """One direction of a relayed connection ended; the other is cancelled."""
