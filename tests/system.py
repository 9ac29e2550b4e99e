"""Helpers for system tests that need real programs (Xvnc, websockify, Apache, Slurm...).

A system test skips when a program it needs is missing, unless ``GATEWAY_REQUIRE_SYSTEM=1`` is set
(as on the CI machine that has everything installed): then a missing program is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["REQUIRE_SYSTEM_ENV", "system_required", "require_program", "free_port", "free_ports", "chromium_browser",
           "CHROMIUM_ARGS"]

#: Flags that let Debian's Chromium run headless as root on a machine without network (see facts.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

REQUIRE_SYSTEM_ENV = "GATEWAY_REQUIRE_SYSTEM"


def system_required() -> bool:
    """True when missing system components must fail tests instead of skipping them."""
    return os.environ.get(REQUIRE_SYSTEM_ENV) == "1"


def require_program(name: str) -> str:
    """Return the path of program ``name`` (as found by shutil.which).

    If it is missing, skip the calling test, or fail it when GATEWAY_REQUIRE_SYSTEM=1.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (not found on PATH)"
    if system_required():
        pytest.fail(f"{message}, and {REQUIRE_SYSTEM_ENV}=1 requires it", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All are bound at once before any is released: calling :func:`free_port` repeatedly may hand
    out the same port twice.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def chromium_browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright (never a downloaded browser); closed afterwards.

    Skips, or fails under GATEWAY_REQUIRE_SYSTEM=1, when Chromium or Playwright is missing.
    """
    chromium = require_program("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if system_required():
            pytest.fail("playwright is not installed")
        pytest.skip("playwright is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
