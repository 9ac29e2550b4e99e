"""What a participant does: open the landing page, click the account, type the password, see a desktop.

Real headless Chromium (Debian's, driven by Playwright) against a real `gateway up`.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.gateway_run import GatewayRun, display_env
from tests.system import require_program, system_required

pytestmark = pytest.mark.system

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

DISTINCT_COLOURS_JS = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || canvas.width === 0) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < data.length; i += 4 * 97) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  return seen.size;
}"""


@pytest.fixture
def browser() -> Iterator:
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


def test_participant_gets_a_drawn_desktop(browser, running: GatewayRun) -> None:
    account = running.accounts[0]
    page = open_viewer(browser, running, account.id)
    page.fill("#password", account.password)
    page.click("#connect")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    # The desktop is drawn: a window manager and a terminal give many colours, not a blank canvas.
    deadline = time.monotonic() + 15
    colours = 0
    while time.monotonic() < deadline and colours < 3:
        colours = page.evaluate(DISTINCT_COLOURS_JS)
        time.sleep(0.2)
    assert colours >= 3, f"canvas looks blank ({colours} colours)"
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
