"""What a participant does: open the landing page, click the account, type the password, see a desktop.

Real headless Chromium (Debian's, driven by Playwright) against a real `gateway up`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from gateway.common import rfb
from tests.gateway_run import GatewayRun, display_env
from tests.system import chromium_browser, require_program

pytestmark = pytest.mark.system


CANVAS_PNG_JS = """() => {
  const canvas = document.querySelector('#screen canvas');
  return canvas && canvas.width > 0 ? canvas.toDataURL('image/png') : null;
}"""
CANVAS_BOX_JS = """() => {
  const canvas = document.querySelector('#screen canvas');
  const box = canvas.getBoundingClientRect();
  return {left: box.left, top: box.top, scale: box.width / canvas.width};
}"""


def canvas_image(page) -> Image.Image | None:
    """The viewer's canvas, pixel for pixel (PNG is lossless), as RGB."""
    url = page.evaluate(CANVAS_PNG_JS)
    if not url:
        return None
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def framebuffer_image(account) -> Image.Image:
    """The desktop's screen, grabbed straight from its Xvnc over RFB (not through the gateway)."""
    grab = rfb.grab_tcp("127.0.0.1", account.vnc_port, account.password, timeout_s=15)
    with ThreadPoolExecutor(1) as thread:  # Playwright's sync API holds this thread's event loop
        screen = thread.submit(asyncio.run, grab).result()
    return Image.frombytes("RGB", (screen.width, screen.height), screen.pixels, "raw", "RGBX")


#: JPEG (noVNC asks for Tight with quality 6) changes a gradient, such as a title bar, by a few levels.
JPEG_TOLERANCE = 32


def differing_pixels(first: Image.Image, second: Image.Image) -> int:
    """How many pixels differ by more than JPEG's noise in some channel (all of them when the sizes differ)."""
    if first.size != second.size:
        return first.width * first.height
    channels = ImageChops.difference(first, second).split()
    worst = ImageChops.lighter(ImageChops.lighter(channels[0], channels[1]), channels[2])
    return worst.point(lambda v: 255 if v > JPEG_TOLERANCE else 0).histogram()[255]


def wait_until_canvas_shows(page, account, timeout_s: float = 15) -> Image.Image:
    """Wait until the canvas equals the desktop's framebuffer; returns that picture."""
    deadline = time.monotonic() + timeout_s
    while True:
        canvas = canvas_image(page)
        try:
            screen = framebuffer_image(account)
        except (OSError, rfb.RfbError):  # Xvnc drops a grab while the viewer resizes the desktop
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
            continue
        if canvas is not None and differing_pixels(canvas, screen) == 0:
            return screen
        if time.monotonic() > deadline:
            size = None if canvas is None else canvas.size
            pytest.fail(f"the canvas ({size}) never showed the desktop's screen {screen.size}: "
                        f"{differing_pixels(canvas, screen) if canvas else 'no canvas'} pixels differ")
        time.sleep(0.3)


def terminal_window(run: GatewayRun, account) -> tuple[int, int, int, int]:
    """x, y, width, height of the desktop's terminal, found by its class (bash retitles it), and
    checked to be a process of the desktop's own user."""
    env = display_env(run.state_dir, account.id)
    deadline = time.monotonic() + 15
    windows: list[str] = []
    while not windows and time.monotonic() < deadline:
        found = subprocess.run([require_program("xdotool"), "search", "--onlyvisible", "--class", "xterm"],
                               capture_output=True, text=True, timeout=10, env=env)
        windows = found.stdout.split()
        time.sleep(0.2)
    assert len(windows) == 1, f"expected the desktop's terminal window, found {windows}"
    pid = subprocess.run(["xdotool", "getwindowpid", windows[0]], capture_output=True, text=True, timeout=10,
                         env=env).stdout.strip()
    assert pid.isdigit() and Path(f"/proc/{pid}").stat().st_uid == run.users()[account.id].uid
    info = subprocess.run([require_program("xwininfo"), "-id", windows[0]], capture_output=True, text=True,
                          timeout=10, env=env).stdout
    values = {key: int(re.search(rf"{key}:\s+(-?\d+)", info).group(1))  # type: ignore[union-attr]
              for key in ("Absolute upper-left X", "Absolute upper-left Y", "Width", "Height")}
    return (values["Absolute upper-left X"], values["Absolute upper-left Y"], values["Width"], values["Height"])


@pytest.fixture
def browser() -> Iterator:
    with chromium_browser() as launched:
        yield launched


@pytest.fixture
def running(gateway_factory) -> Iterator[GatewayRun]:
    run: GatewayRun = gateway_factory(count=2)
    run.up()
    yield run
    run.terminate()


def open_viewer(browser, run: GatewayRun, account_id: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(run.url)
    page.click(f'a.account[data-account="{account_id}"]')
    page.wait_for_url(f"**/view/{account_id}")
    return page


def test_participant_sees_the_desktop_and_types_into_its_terminal(browser, running: GatewayRun) -> None:
    account = running.accounts[0]
    page = open_viewer(browser, running, account.id)
    page.fill("#password", account.password)
    page.click("#connect")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    # The canvas is the desktop's own screen, pixel for pixel (grabbed from its Xvnc directly), and
    # that screen shows the terminal: not a blank, partial or stale picture, nor another desktop.
    x, y, width, height = terminal_window(running, account)
    screen = wait_until_canvas_shows(page, account)
    inside = screen.crop((max(x, 0), max(y, 0), x + width, y + height))
    assert len(inside.getcolors(maxcolors=1 << 16) or ()) >= 2, "the terminal shows no text"

    # Typed on the page, a command runs in the terminal, as the desktop's user, in its home.
    box = page.evaluate(CANVAS_BOX_JS)
    page.mouse.click(box["left"] + (x + width / 2) * box["scale"], box["top"] + (y + height / 2) * box["scale"])
    name = f"typed-{secrets.token_hex(4)}"
    page.keyboard.type(f"touch ~/{name}")
    page.keyboard.press("Enter")
    created = running.workspace(account) / name
    deadline = time.monotonic() + 15
    while not created.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert created.exists(), f"typing `touch ~/{name}` in the page made no file in {created.parent}"
    assert created.stat().st_uid == running.users()[account.id].uid
    # And the page follows the desktop: the typed command is on both pictures.
    assert differing_pixels(wait_until_canvas_shows(page, account), screen) > 0

    # The password went nowhere but the RFB handshake.
    assert account.password not in page.url
    assert account.password not in page.evaluate("() => JSON.stringify(localStorage)")
    page.close()


def test_wrong_password_says_so(browser, running: GatewayRun) -> None:
    page = open_viewer(browser, running, running.accounts[1].id)
    page.fill("#password", "wrongpw1")
    page.click("#connect")
    page.wait_for_selector('#status[data-state="wrong-password"]', timeout=20000)
    assert "Wrong password" in page.inner_text("#status")
    page.close()


def test_paste_box_reaches_the_desktop_clipboard_and_quality_applies(browser, running: GatewayRun) -> None:
    xclip = require_program("xclip")
    account = running.accounts[0]
    page = open_viewer(browser, running, account.id)
    page.fill("#password", account.password)
    page.click("#connect")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)

    page.click("#toggle-clipboard")
    text = "module load gcc && make -j4  # äöü"
    page.fill("#clipboard-text", text)
    page.click("#clipboard-send")
    x_env = display_env(running.state_dir, account.id)
    deadline = time.monotonic() + 10
    seen = ""
    while time.monotonic() < deadline and seen != text:
        result = subprocess.run([xclip, "-o", "-selection", "clipboard"], capture_output=True, text=True, timeout=5,
                                env=x_env)
        seen = result.stdout
        time.sleep(0.2)
    assert seen == text

    # And back: text copied inside the desktop shows up in the page's clipboard panel.
    copied = "result: 42 ✓"
    subprocess.run([xclip, "-i", "-selection", "clipboard"], input=copied, text=True, timeout=10, check=True,
                   env=x_env)
    page.wait_for_function("text => document.getElementById('clipboard-received').value === text", arg=copied,
                           timeout=10000)

    page.click("#toggle-settings")
    page.eval_on_selector("#quality", "el => { el.value = '3'; el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true})); }")
    assert page.evaluate("() => window.gatewayViewer.rfb.qualityLevel") == 3
    page.close()


def test_participant_picks_the_desktop_keyboard_layout(browser, running: GatewayRun) -> None:
    setxkbmap = require_program("setxkbmap")
    account = running.accounts[1]
    page = open_viewer(browser, running, account.id)
    page.fill("#password", account.password)
    page.click("#connect")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    page.click("#toggle-settings")
    page.select_option("#keyboard-layout", "de")
    page.wait_for_function("() => document.getElementById('keyboard-message').textContent.includes('now uses')",
                           timeout=10000)
    query = subprocess.run([setxkbmap, "-query"], capture_output=True, text=True, timeout=10,
                           env=display_env(running.state_dir, account.id))
    assert "layout:     de" in query.stdout
    page.close()


def test_keyboard_layout_needs_the_accounts_password(running: GatewayRun) -> None:
    import json
    import urllib.error
    import urllib.request

    first, second = running.accounts
    url = running.url + f"api/desktops/{first.id}/keyboard"

    def post(body: dict) -> int:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert post({"password": second.password, "layout": "fr"}) == 403   # another account's password
    assert post({"password": first.password, "layout": "fr; rm -rf /"}) == 400
    assert post({"password": first.password, "layout": "fr"}) == 200
    for _ in range(5):
        post({"password": "wrongpw1", "layout": "fr"})
    assert post({"password": first.password, "layout": "fr"}) == 429     # brute force is limited
