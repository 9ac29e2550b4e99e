"""A participant's day in real Chromium (Playwright) against one real `gateway up` (Xvnc, Apache):
sign up on the landing page, keep the password, reach the desktop without typing it again, a viewer
that fits a laptop and a phone, a stopped desktop explained in the page, and the organiser's page.

Screenshots of every page land in the test's directory (and, with GATEWAY_SCREENSHOTS=DIR, in DIR).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_run import GatewayRun, running_gateway
from tests.system import chromium_browser

pytestmark = pytest.mark.system

LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}
CODE = "Owl-42"
CONFIG = f"""\
event:
  title: Summer school on parallel programming
registration:
  enabled: true
  documents: [terms.md]
  event_code: {CODE}
proxy:
  mode: builtin                 # the mode README recommends for events
viewer:
  quality: 3
  compression: 5
"""
TERMS = "# Terms of use\n\nBe kind to the machines and to each other.\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[GatewayRun]:
    with running_gateway(tmp_path_factory.mktemp("day"), 3, CONFIG, files={"terms.md": TERMS}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium_browser() as launched:
        yield launched


def shot(page, run: GatewayRun, name: str) -> Path:
    """A screenshot to look at; also into $GATEWAY_SCREENSHOTS when set (README's pictures)."""
    path = run.tmp / f"{name}.png"
    page.screenshot(path=str(path))
    wanted = os.environ.get("GATEWAY_SCREENSHOTS")
    if wanted:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(wanted) / path.name)
    return path


def gateway_cli(run: GatewayRun, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--state-dir", str(run.state_dir)],
                          capture_output=True, text=True, timeout=60)


def wait_connected(page, timeout_ms: int = 20000) -> None:
    page.wait_for_selector('#status[data-state="connected"]', timeout=timeout_ms)


def toolbar_rows(page) -> int:
    """How many rows the visible toolbar controls take (distinct tops of the visible items)."""
    return page.evaluate("""() => {
      const tops = new Set();
      for (const el of document.querySelectorAll('#toolbar .tool-row > *, #toolbar .tool-row > * > *, #toolbar .tool-menu > .tool-group > *')) {
        const r = el.getBoundingClientRect();
        if (r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden') tops.add(Math.round(r.top / 8));
      }
      return tops.size;
    }""")


def toolbar_overflow(page) -> float:
    """How far the toolbar's rightmost visible control sticks out of the window (0: it fits)."""
    return page.evaluate("""() => {
      const right = Math.max(...[...document.querySelectorAll('#toolbar .tool-row > *, #toolbar .tool-row > * > *, #toolbar .tool-menu > .tool-group > *')]
        .map((e) => e.getBoundingClientRect()).filter((r) => r.width > 0).map((r) => r.right));
      return Math.max(0, right - window.innerWidth);
    }""")


def claim(run: GatewayRun, account: str, email: str, name: str) -> None:
    """Record a sign-up for ``account`` unless it has one (as the form would)."""
    with sqlite3.connect(run.state_dir / "gateway.db") as db:
        if db.execute("SELECT 1 FROM claims WHERE account = ?", (account,)).fetchone() is None:
            db.execute("INSERT INTO claims(account, email, name, address, claimed_at) VALUES (?, ?, ?, ?, ?)",
                       (account, email, name, "127.0.0.1", time.time()))


# -- sign-up to desktop --------------------------------------------------------------------------------


def test_sign_up_keeps_the_form_signs_in_and_opens_the_desktop_without_retyping(run: GatewayRun, browser) -> None:
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    page.goto(run.url)
    # Sign up and Sign in are the page's main actions; the list of accounts steps back.
    assert page.is_visible("#signup-link") and page.is_visible("#signin-link")
    assert not page.is_visible('a.account[data-account="ws01"]')
    shot(page, run, "landing-signup-1366")
    page.click("#signup-link")

    # Mistakes: a wrong code and an unticked box. What was typed stays; errors sit by their fields.
    page.fill("#name", "Ada Lovelace")
    page.fill("#email", "ada@example.org")
    page.fill("#event_code", "owl-41")
    page.click("button[type=submit]")
    assert page.input_value("#name") == "Ada Lovelace" and page.input_value("#email") == "ada@example.org"
    assert page.input_value("#event_code") == "owl-41"
    assert page.get_attribute("#event_code", "aria-describedby").split()[-1] == "event_code-error"
    assert "not right" in page.inner_text("#event_code-error")
    assert "accept" in page.inner_text("#accept-0-error")
    page.check("#accept-0")
    page.fill("#event_code", "  OWL-42 ")   # case and spaces don't matter
    shot(page, run, "signup-errors-1366")
    page.click("button[type=submit]")

    # The result page: account, password, a copy button; it survives reload and Back.
    page.wait_for_url("**/welcome")
    account = page.inner_text("#account").strip()
    password = page.inner_text("#password").strip()
    expected = {a.id: a.password for a in run.accounts}
    assert expected[account] == password
    assert page.is_visible("#copy-password")
    shot(page, run, "welcome-1366")
    page.reload()
    assert page.inner_text("#password").strip() == password
    page.click("#open-desktop")
    page.wait_for_url(f"**/view/{account}")
    wait_connected(page)   # signed in: no password typed
    assert page.is_hidden("#login")
    assert password not in page.url
    page.go_back()
    page.wait_for_url("**/welcome")
    assert page.inner_text("#password").strip() == password   # no "Confirm Form Resubmission"

    # The personal page shows the password again, to this session only.
    page.goto(run.url + "me")
    assert password not in page.content()
    page.click("#show-password")
    page.wait_for_function("() => document.getElementById('password').textContent.length > 0")
    assert page.inner_text("#password") == password
    shot(page, run, "me-1366")
    stranger = browser.new_context()
    response = stranger.request.get(run.url + "me/password")
    assert response.status == 401 and password not in response.text()
    stranger.close()

    # Sign-out asks first; sign-in ignores case and spaces ("WS01 ").
    page.click("#signout")
    page.wait_for_url("**/logout")
    page.click("#confirm-signout")
    page.wait_for_url("**/login?signed_out=1")
    assert page.is_visible("#signed-out") and page.is_visible("#signup-link")
    page.fill("#account", f" {account.upper()} ")
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/me")
    context.close()


def test_viewer_fits_a_laptop_in_one_toolbar_row_and_uses_the_event_defaults(run: GatewayRun, browser) -> None:
    account = run.accounts[2]
    for viewport, name in ((LAPTOP, "1366"), ({"width": 1280, "height": 720}, "1280")):
        page = browser.new_page(viewport=viewport)
        page.goto(run.url + f"view/{account.id}")
        assert page.inner_text("label[for=password]") == "Password"
        page.fill("#password", account.password)
        page.click("#connect")
        wait_connected(page)
        assert toolbar_rows(page) == 1, name
        assert toolbar_overflow(page) == 0, name
        assert page.is_visible("#keyboard-layout") and page.is_visible("#toggle-clipboard")
        assert page.inner_text("#account-label").split().count(account.id) == 1   # not "ws03 ws03"
        # The event's defaults apply (viewer: in the config) ...
        assert page.evaluate("() => [window.gatewayViewer.rfb.qualityLevel, window.gatewayViewer.rfb.compressionLevel]") == [3, 5]
        if name == "1366":
            shot(page, run, "viewer-1366")
            # ... until the participant chooses otherwise, which wins on the next visit.
            page.click("#toggle-settings")
            page.eval_on_selector("#quality", "el => { el.value = '8'; el.dispatchEvent(new Event('change')); }")
            page.reload()
            wait_connected(page)   # the typed password signed this browser in: no second typing
            assert page.evaluate("() => [window.gatewayViewer.rfb.qualityLevel, window.gatewayViewer.rfb.compressionLevel]") == [8, 5]
        page.close()


def test_viewer_on_a_phone_is_one_short_row_with_a_menu_and_full_screen_shows_only_the_desktop(
        run: GatewayRun, browser) -> None:
    account = run.accounts[2]
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(run.url + f"view/{account.id}")
    page.fill("#password", account.password)
    page.click("#connect")
    wait_connected(page)
    toolbar = page.locator("#toolbar").bounding_box()
    header = page.locator(".site-header").bounding_box()
    assert toolbar is not None and header is not None
    assert toolbar["height"] <= 56, toolbar
    assert header["height"] + toolbar["height"] <= 0.15 * PHONE["height"]
    assert toolbar_rows(page) == 1 and toolbar_overflow(page) == 0
    assert page.is_visible("#key-keyboard")   # the on-screen keyboard button, on touch screens
    shot(page, run, "viewer-390")
    page.click("#menu-toggle")
    assert page.is_visible("#keyboard-layout") and page.is_visible("#toggle-clipboard")
    shot(page, run, "viewer-menu-390")
    page.click("#menu-toggle")

    # The on-screen keyboard's text reaches the desktop.
    page.click("#key-keyboard")
    assert page.evaluate("() => document.activeElement.id") == "touch-input"

    # Full screen: only the desktop, and a handle that brings the controls back.
    page.click("#menu-toggle")
    page.click("#fullscreen")
    page.wait_for_selector("body.is-fullscreen", timeout=5000)
    assert page.is_hidden(".site-header") and page.is_hidden("#toolbar")
    assert page.is_visible("#controls-handle")
    shot(page, run, "viewer-fullscreen-390")
    page.click("#controls-handle")
    assert page.is_visible("#toolbar")
    context.close()


def test_a_stopped_desktop_is_explained_in_the_page_without_a_countdown(run: GatewayRun, browser) -> None:
    account = run.accounts[1]
    page = browser.new_page(viewport=LAPTOP)
    page.goto(run.url + f"view/{account.id}")
    page.fill("#password", account.password)
    page.click("#connect")
    wait_connected(page)
    stopped = gateway_cli(run, "desktop", "stop", account.id)
    assert stopped.returncode == 0, stopped.stderr
    page.wait_for_selector('#desktop-message[data-desktop-state="stopped"]', state="visible", timeout=15000)
    assert "ask them to start it again" in page.inner_text("#desktop-message").lower()
    time.sleep(2)
    assert "Reconnecting in" not in page.inner_text("#status")
    assert page.get_attribute("#status", "data-state") == "unavailable"
    shot(page, run, "viewer-stopped-1366")
    started = gateway_cli(run, "desktop", "start", account.id)
    assert started.returncode == 0, started.stderr
    wait_connected(page, 30000)   # back by itself, no password asked
    page.close()


def test_admin_rows_update_in_place_so_focus_and_messages_survive(run: GatewayRun, browser) -> None:
    claim(run, "ws01", "ada@example.org", "Ada Lovelace")   # as the sign-up test did (when run alone)
    password = (run.state_dir / "secrets" / "admin.password").read_text().strip()
    context = browser.new_context(viewport=LAPTOP, http_credentials={"username": "admin", "password": password})
    page = context.new_page()
    page.goto(run.url + "admin/")
    page.wait_for_function("() => window.gatewayAdmin.rows.length === 3")
    # Who signed up is in its own column.
    assert "Ada Lovelace <ada@example.org>" in page.inner_text('tr[data-account="ws01"] td[data-column="participant"]')
    # A share link lands in a labelled box with account, expiry and a copy button, and stays there.
    page.once("dialog", lambda dialog: dialog.accept("30"))
    page.click('button[aria-label="share a view-only link to ws03"]')
    page.wait_for_selector("#share-box", state="visible")
    assert page.inner_text("#share-account") == "ws03" and page.inner_text("#share-expiry")
    assert "/watch/" in page.input_value("#share-link") and page.is_visible("#share-copy")
    assert page.inner_text("label[for=share-link]") == "Link"
    message = page.inner_text("#admin-message")
    assert "valid until" in message
    # Keyboard focus on a row's button survives 10 s of live updates; so does the message.
    page.focus('button[aria-label="disconnect ws02"]')
    updates = page.evaluate("() => window.gatewayAdmin.updates")
    time.sleep(10)
    assert page.evaluate("() => window.gatewayAdmin.updates") >= updates + 4
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')") == "disconnect ws02"
    assert page.inner_text("#admin-message") == message
    # Sort indicators.
    page.click('th button[data-sort="account"]')
    assert page.get_attribute('th:has(button[data-sort="account"])', "aria-sort") == "descending"
    assert page.eval_on_selector_all("#desktops tbody tr", "trs => trs.map(t => t.dataset.account)") == ["ws03", "ws02", "ws01"]
    shot(page, run, "admin-1366")
    # Typing in the filter is not interrupted (updates wait for a pause).
    page.click("#admin-filter")
    page.keyboard.type("ws0", delay=400)
    assert page.evaluate("() => document.activeElement.id") == "admin-filter"
    page.keyboard.type("1")
    assert page.eval_on_selector_all("#desktops tbody tr:not([hidden])", "trs => trs.map(t => t.dataset.account)") == ["ws01"]
    # A wrong share link gets a real page that says what to do.
    stale = context.new_page()
    answer = stale.goto(run.url + "watch/not-a-real-token")
    assert answer.status == 404 and "does not work" in stale.inner_text("h1")
    stale.close()
    # On a phone the rows become cards that fit the screen.
    page.set_viewport_size(PHONE)
    page.fill("#admin-filter", "")
    page.wait_for_timeout(300)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    shot(page, run, "admin-390")
    context.close()


def test_all_accounts_taken_is_said_before_the_form(run: GatewayRun, browser) -> None:
    for account in run.accounts:
        claim(run, account.id, f"{account.id}@example.org", "Someone")
    page = browser.new_page(viewport=PHONE)
    page.goto(run.url)
    assert page.is_visible("#all-taken") and not page.is_visible("#signup-link")
    shot(page, run, "landing-taken-390")
    page.goto(run.url + "signup")
    assert page.is_visible("#all-taken") and page.locator("#name").count() == 0
    # Titles don't clip on a phone.
    assert page.evaluate("() => { const t = document.querySelector('.brand-title'); return t.scrollWidth <= t.clientWidth + 1; }")
    page.close()


def test_theme_colours_keep_wcag_aa_contrast() -> None:
    from gateway.web.theme import AA_CONTRAST, contrast, rgb, theme_colours

    assert theme_colours("#1f4fd1") == ({}, [])                 # the default blue is fine with white text
    colours, warnings = theme_colours("#ffcc00")                # a yellow is not
    assert colours["on_primary"] == "#14181f" and "below WCAG AA" in warnings[0]
    assert contrast(rgb(colours["primary_text"]), (1.0, 1.0, 1.0)) >= AA_CONTRAST
