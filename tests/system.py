"""Helpers for system tests that need real programs (Xvnc, websockify, Apache, Slurm...).

A system test skips when a program it needs is missing, unless ``GATEWAY_REQUIRE_SYSTEM=1`` is set
(as on the CI machine that has everything installed): then a missing program is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = ["wait_for", "message_windows", "REQUIRE_SYSTEM_ENV", "system_required", "skip_or_fail", "require_program", "require_slurm_cluster",
           "free_port", "free_ports", "chromium_browser", "CHROMIUM_ARGS", "mouse_location"]

#: Flags that let Debian's Chromium run headless as root on a machine without network (see facts.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

REQUIRE_SYSTEM_ENV = "GATEWAY_REQUIRE_SYSTEM"


def system_required() -> bool:
    """True when missing system components must fail tests instead of skipping them."""
    return os.environ.get(REQUIRE_SYSTEM_ENV) == "1"


def skip_or_fail(message: str) -> NoReturn:
    """A system component is missing: skip the calling test, or fail it when GATEWAY_REQUIRE_SYSTEM=1."""
    if system_required():
        pytest.fail(f"{message}, and {REQUIRE_SYSTEM_ENV}=1 requires it", pytrace=False)
    pytest.skip(message)


def require_program(name: str) -> str:
    """Return the path of program ``name`` (as found by shutil.which).

    If it is missing, skip the calling test, or fail it when GATEWAY_REQUIRE_SYSTEM=1.
    """
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (not found on PATH)")
    return path


SLURM_PROGRAMS = ("sinfo", "sbatch", "squeue", "scancel", "scontrol")


def require_slurm_cluster(*programs: str, partition: str | None = None, gres: str | None = None) -> None:
    """The project's Slurm test cluster answers ``sinfo``; skip the calling test, or fail it when
    GATEWAY_REQUIRE_SYSTEM=1, if not.

    ``programs`` are needed besides the Slurm commands. With ``partition``, that partition must exist;
    with ``gres`` too, its nodes must advertise that generic resource (e.g. the "gpu" of the gpu partition).
    """
    for program in (*SLURM_PROGRAMS, *programs):
        require_program(program)
    argv = ["sinfo", "--noheader"]
    if partition is not None:
        argv.append(f"--partition={partition}")
    if gres is not None:
        argv.append("--format=%G")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        detail = result.stderr.strip() or result.stdout.strip()
        answered = result.returncode == 0 and bool(result.stdout.strip())
    except subprocess.TimeoutExpired:
        answered, detail = False, "timed out"
    if answered and gres is not None and gres not in result.stdout:
        answered, detail = False, f"its nodes advertise no {gres}: {detail}"
    if not answered:
        wanted = f"the Slurm test cluster's partition {partition}" if partition else "the Slurm test cluster"
        skip_or_fail(f"{wanted} is not usable (run scripts/test-slurm-cluster up): "
                     f"{detail or 'no such partition'}")


#: Under pytest-xdist each worker hands out ports of a range of its own, in turn, so that two workers never
#: pick the same port between choosing it and a server binding it, and one worker does not hand out a port
#: again soon after. The ranges lie below the kernel's ephemeral ports (32768 and up), which outgoing
#: connections and port-0 binds use.
_WORKER_PORTS_START = 20000
_WORKER_PORTS_EACH = 3000
_worker_port_offset = 0


def _worker_range() -> range | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    start = _WORKER_PORTS_START + _WORKER_PORTS_EACH * (int(worker[2:]) % 4)
    return range(start, start + _WORKER_PORTS_EACH)


def _bind_free(sock: socket.socket, ports: range | None) -> None:
    """Bind ``sock`` on 127.0.0.1 to the next free port of ``ports``, or to any free port."""
    global _worker_port_offset
    if ports is None:
        sock.bind(("127.0.0.1", 0))
        return
    for _ in range(len(ports)):
        port = ports[_worker_port_offset]
        _worker_port_offset = (_worker_port_offset + 1) % len(ports)
        try:
            sock.bind(("127.0.0.1", port))
            return
        except OSError:
            continue
    raise OSError(f"no free port in {ports}")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All are bound at once before any is released: binding port 0 repeatedly may hand out the same
    port twice.
    """
    ports = _worker_range()
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            _bind_free(sock, ports)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def chromium_browser(wrap: Callable[[str], str | Path] | None = None) -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright (never a downloaded browser); closed afterwards.

    ``wrap(chromium)`` gives the program to launch instead, e.g. a script that runs Chromium in a
    network namespace (tests/netem.py). Skips, or fails under GATEWAY_REQUIRE_SYSTEM=1, when Chromium
    or Playwright is missing.
    """
    chromium = require_program("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed")
    executable = str(wrap(chromium)) if wrap is not None else chromium
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def mouse_location(x_env: dict[str, str]) -> tuple[int, int]:
    """Where the pointer is on the X display of ``x_env`` (see gateway_run.display_env), by xdotool."""
    xdotool = require_program("xdotool")
    out = subprocess.run([xdotool, "getmouselocation", "--shell"], capture_output=True, text=True, timeout=10,
                         env=x_env).stdout
    values = dict(line.split("=", 1) for line in out.split())
    return int(values["X"]), int(values["Y"])


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20, interval_s: float = 0.2) -> Any:
    """Call ``predicate`` until it returns something true or ``timeout_s`` passed; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def message_windows(env: dict[str, str]) -> list[str]:
    """The xmessage windows (the gateway's notices) on the display of ``env`` (DISPLAY, XAUTHORITY)."""
    xdotool = require_program("xdotool")
    result = subprocess.run([xdotool, "search", "--class", "xmessage"], capture_output=True, text=True, timeout=10,
                            env={**env, "PATH": "/usr/bin:/bin"})
    return result.stdout.split()
