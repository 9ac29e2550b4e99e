"""A participant's day in real Chromium (Playwright) against one real `gateway up` (Xvnc, Apache):
sign up on the landing page, keep the password, reach the desktop without typing it again, a viewer
that fits a laptop and a phone, a stopped or failed desktop explained in the page (and on the personal
page, which follows by itself), a viewer too many told why, and the organiser's page. What participants
and organisers see is tried on a laptop (1366x768) and a phone (390x844).

Screenshots of every page land in the test's directory (and, with GATEWAY_SCREENSHOTS=DIR, in DIR).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_run import GatewayRun, running_gateway
from tests.os_check import xvnc_on_port
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
  max_viewers_per_account: 2    # a third viewer is refused (and told why)
viewer:
  quality: 3
  compression: 5
"""
TERMS = "# Terms of use\n\nBe kind to the machines and to each other.\n"
#: A second gateway whose desktops fail for good at their second crash, in a websockify mode (Apache
#: refuses a viewer over the cap with a 429 the page cannot see).
FRAGILE_CONFIG = """\
proxy:
  mode: per-account
  max_viewers_per_account: 2
restart:
  max_attempts: 1
  backoff_initial_s: 0.2
  backoff_max_s: 0.5
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[GatewayRun]:
    with running_gateway(tmp_path_factory.mktemp("day"), 3, CONFIG, files={"terms.md": TERMS}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def fragile(tmp_path_factory) -> Iterator[GatewayRun]:
    with running_gateway(tmp_path_factory.mktemp("fragile"), 2, FRAGILE_CONFIG) as gateway:
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


#: The two screens every participant's page is tried on: a laptop and a phone (touch, mobile).
SCREENS = (("1366", {"viewport": LAPTOP}), ("390", {"viewport": PHONE, "is_mobile": True, "has_touch": True}))
#: Who signs up on each screen (each takes an account of its own).
PEOPLE = {"1366": ("Ada Lovelace", "ada@example.org"), "390": ("Grace Hopper", "grace@example.org")}


def test_sign_up_keeps_the_form_signs_in_and_opens_the_desktop_without_retyping(run: GatewayRun, browser) -> None:
    taken: set[str] = set()
    for size, screen in SCREENS:   # one gateway, both screens: each signs up for an account of its own
        account = sign_up_on(browser, run, size, screen)
        assert account not in taken
        taken.add(account)


def sign_up_on(browser, run: GatewayRun, size: str, screen: dict) -> str:
    name, email = PEOPLE[size]
    context = browser.new_context(**screen)
    page = context.new_page()
    page.goto(run.url)
    # Sign up and Sign in are the page's main actions; the list of accounts steps back.
    assert page.is_visible("#signup-link") and page.is_visible("#signin-link")
    assert not page.is_visible('a.account[data-account="ws01"]')
    shot(page, run, f"landing-signup-{size}")
    page.click("#signup-link")

    # Mistakes: a wrong code and an unticked box. What was typed stays; errors sit by their fields.
    page.fill("#name", name)
    page.fill("#email", email)
    page.fill("#event_code", "owl-41")
    page.click("button[type=submit]")
    assert page.input_value("#name") == name and page.input_value("#email") == email
    assert page.input_value("#event_code") == "owl-41"
    assert page.get_attribute("#event_code", "aria-describedby").split()[-1] == "event_code-error"
    assert "not right" in page.inner_text("#event_code-error")
    assert "accept" in page.inner_text("#accept-0-error")
    page.check("#accept-0")
    page.fill("#event_code", "  OWL-42 ")   # case and spaces don't matter
    shot(page, run, f"signup-errors-{size}")
    page.click("button[type=submit]")

    # The result page: account, password, a copy button; it survives reload and Back.
    page.wait_for_url("**/welcome")
    account = page.inner_text("#account").strip()
    password = page.inner_text("#password").strip()
    expected = {a.id: a.password for a in run.accounts}
    assert expected[account] == password
    assert page.is_visible("#copy-password")
    shot(page, run, f"welcome-{size}")
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
    assert page.evaluate("() => document.documentElement.scrollWidth") <= page.viewport_size["width"]
    shot(page, run, f"me-{size}")
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
    return account


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
    admin = {"http_credentials": {"username": "admin", "password": password}}
    context = browser.new_context(viewport=LAPTOP, **admin)
    page = context.new_page()
    # The same page on a phone, open at the same time: its rows are cards.
    phone_context = browser.new_context(**dict(SCREENS)["390"], **admin)
    phone = phone_context.new_page()
    for each in (page, phone):
        each.goto(run.url + "admin/")
        each.wait_for_function("() => window.gatewayAdmin.rows.length === 3")
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
    # Keyboard focus on a row's button survives 10 s of live updates, on both screens; so does the message.
    focused = {page: "disconnect ws02", phone: "disconnect ws01"}
    for each, label in focused.items():
        each.focus(f'button[aria-label="{label}"]')
    updates = {each: each.evaluate("() => window.gatewayAdmin.updates") for each in focused}
    time.sleep(10)
    for each, label in focused.items():
        assert each.evaluate("() => window.gatewayAdmin.updates") >= updates[each] + 4
        assert each.evaluate("() => document.activeElement.getAttribute('aria-label')") == label
    assert page.inner_text("#admin-message") == message
    # Sort indicators.
    page.click('th button[data-sort="account"]')
    assert page.get_attribute('th:has(button[data-sort="account"])', "aria-sort") == "descending"
    assert page.eval_on_selector_all("#desktops tbody tr", "trs => trs.map(t => t.dataset.account)") == ["ws03", "ws02", "ws01"]
    shot(page, run, "admin-1366")
    # Typing in the filter is not interrupted: updates that arrive meanwhile wait until the typing pauses.
    page.click("#admin-filter")
    page.keyboard.type("ws0", delay=400)
    applied, received = page.evaluate("() => [window.gatewayAdmin.applied, window.gatewayAdmin.updates]")
    for _ in range(6):   # ~5 s of typing, never pausing long: updates come every 2 s
        page.keyboard.press("Backspace")
        page.wait_for_timeout(400)
        page.keyboard.type("0")
        page.wait_for_timeout(400)
    assert page.evaluate("() => window.gatewayAdmin.updates") >= received + 2
    assert page.evaluate("() => window.gatewayAdmin.applied") == applied
    assert page.inner_text("#live-note") == "Live updates paused while you type"
    assert page.evaluate("() => document.activeElement.id") == "admin-filter"
    page.keyboard.type("1")
    assert page.eval_on_selector_all("#desktops tbody tr:not([hidden])", "trs => trs.map(t => t.dataset.account)") == ["ws01"]
    page.wait_for_function(f"() => window.gatewayAdmin.applied > {applied}", timeout=5000)   # after the pause
    assert page.inner_text("#live-note") == "Live"
    # The share link opens a page that says it is view only, on both screens.
    link = page.input_value("#share-link")
    for size, screen in SCREENS:
        watch_context = browser.new_context(**screen)
        watch = watch_context.new_page()
        watch.goto(link)
        wait_connected(watch)
        assert watch.is_visible("#view-only-badge") and watch.text_content("#view-only-badge").strip() == "View only"
        assert "view only" in watch.inner_text("#status-text")
        shot(watch, run, f"watch-{size}")
        watch_context.close()
    # A wrong share link gets a real page that says what to do.
    stale = context.new_page()
    answer = stale.goto(run.url + "watch/not-a-real-token")
    assert answer.status == 404 and "does not work" in stale.inner_text("h1")
    stale.close()
    # On a phone the rows become cards that fit the screen.
    assert phone.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    shot(phone, run, "admin-390")
    phone_context.close()
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


# -- a desktop that fails, a viewer too many -------------------------------------------------------------


def open_viewer_typing(browser, run: GatewayRun, account, screen: dict, *, connected: bool = True):
    """A viewer in a browser of its own (no session), the password typed: connected, unless told not
    to wait for that. What the page logs is kept in ``page.logs``."""
    context = browser.new_context(**screen)
    page = context.new_page()
    page.logs = []
    page.on("console", lambda message: page.logs.append(message.text))
    page.goto(run.url + f"view/{account.id}")
    page.fill("#password", account.password)
    page.click("#connect")
    if connected:
        wait_connected(page)
    return page


def desktop_state(run: GatewayRun, account_id: str) -> str:
    with urllib.request.urlopen(run.url + "api/desktops", timeout=10) as response:
        return {d["account"]: d["state"] for d in json.load(response)["desktops"]}[account_id]


def kill_xvnc(run: GatewayRun, account) -> str:
    """SIGKILL the desktop's X server; returns what the gateway made of it: "ready" (a new X server)
    or "failed"."""
    ((pid, _),) = xvnc_on_port(account.vnc_port)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        state = desktop_state(run, account.id)
        servers = [server for server, _ in xvnc_on_port(account.vnc_port)]
        if state == "failed" or (state == "ready" and servers and pid not in servers):
            return state
        assert time.monotonic() < deadline, f"the gateway neither restarted nor failed the desktop: {state}"
        time.sleep(0.2)


def test_a_failed_desktop_is_explained_in_the_viewer_and_the_personal_page_follows(fragile: GatewayRun,
                                                                                  browser) -> None:
    account = fragile.accounts[0]
    # The participant's own page, signed in on a laptop; the viewer on a phone.
    context = browser.new_context(viewport=LAPTOP)
    me = context.new_page()
    me.goto(fragile.url + "login")
    me.fill("#account", account.id)
    me.fill("#password", account.password)
    me.click("button[type=submit]")
    me.wait_for_url("**/me")
    assert me.get_attribute("#desktop-state", "data-state") == "ready" and me.is_hidden("#desktop-reason")
    me.evaluate("() => { window.loadedOnce = true; }")   # gone if the page were loaded again
    viewer = open_viewer_typing(browser, fragile, account, dict(SCREENS)["390"])

    assert kill_xvnc(fragile, account) == "ready"   # restarted (restart.max_attempts: 1)...
    wait_connected(viewer, 30000)
    assert kill_xvnc(fragile, account) == "failed"  # ...and failed for good at the second crash

    # The viewer says so in its body, with the reason, and counts nothing down.
    viewer.wait_for_selector('#desktop-message[data-desktop-state="failed"]', state="visible", timeout=20000)
    assert "could not start" in viewer.inner_text("#desktop-message-title")
    assert "ask the organisers" in viewer.inner_text("#desktop-message-text").lower()
    time.sleep(2)
    assert viewer.get_attribute("#status", "data-state") == "unavailable"
    assert "Reconnecting" not in viewer.inner_text("#status")
    shot(viewer, fragile, "viewer-failed-390")
    # The personal page follows without being loaded again (it looks every 10 s).
    me.wait_for_function("() => document.getElementById('desktop-state').dataset.state === 'failed'", timeout=20000)
    assert me.evaluate("() => window.loadedOnce") is True
    assert me.text_content("#desktop-state") == "failed" and me.is_visible("#desktop-reason")
    assert me.inner_text("#desktop-reason").strip()
    shot(me, fragile, "me-failed-1366")
    me.set_viewport_size(PHONE)
    assert me.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    shot(me, fragile, "me-failed-390")
    viewer.context.close()
    context.close()


def refused_message(page, every_page: list, timeout_ms: int = 20000) -> str:
    """The refused viewer's message; if it does not come, what every viewer of the test shows and logged."""
    try:
        page.wait_for_selector('#desktop-message[data-desktop-state="too-many-viewers"]', state="visible",
                               timeout=timeout_ms)
    except Exception as exc:
        seen = [(each.get_attribute("#status", "data-state"), each.inner_text("#status"), each.logs)
                for each in every_page]
        raise AssertionError(f"no refusal shown; the viewers show: {seen}") from exc
    return page.inner_text("#desktop-message")


@pytest.mark.parametrize("gateway", ["run", "fragile"])
def test_a_viewer_over_the_cap_says_why_and_waits_for_reconnect(gateway: str, request, browser) -> None:
    """builtin (run): the relay's close reason says so; per-account (fragile): Apache's 429 cannot be
    seen, but the gateway says the desktop is ready while the websocket is refused again and again."""
    run: GatewayRun = request.getfixturevalue(gateway)
    account = run.accounts[-1] if gateway == "fragile" else run.accounts[0]
    connected = [open_viewer_typing(browser, run, account, dict(SCREENS)["1366"]) for _ in range(2)]
    refused = [open_viewer_typing(browser, run, account, screen, connected=False) for _, screen in SCREENS]
    for page in refused:
        text = refused_message(page, connected + refused)
        assert "too many viewers are open for this desktop (at most 2 at once)" in text.lower(), text
        assert "close another tab or window, then press Reconnect" in text, text
        assert page.inner_text("#desktop-message-retry") == "Reconnect" and page.is_hidden("#desktop-message-next")
    time.sleep(2.5)   # nothing counts down, nothing tries again by itself
    for page, (size, _) in zip(refused, SCREENS, strict=True):
        assert page.get_attribute("#status", "data-state") == "refused"
        assert "Reconnecting" not in page.inner_text("#status")
        shot(page, run, f"viewer-refused-{gateway}-{size}")
    # One viewer closes: Reconnect gets its place.
    connected.pop().context.close()
    refused[1].click("#desktop-message-retry")
    wait_connected(refused[1])
    assert refused[0].get_attribute("#status", "data-state") == "refused"
    for page in connected + refused:
        page.context.close()
