"""Issue 8, instructors' tools: view-only watching and share links, the wall of thumbnails, idle
handling and the metrics added for them. Unit tests first, then a real gateway each."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.common import rfb
from gateway.web.cockpit import GatewayMetrics
from gateway.model.config import IdleConfig, parse_config
from gateway.model.errors import InputError
from gateway.supervisor.idle import IdlePolicy, IdleWatcher
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase
from gateway.model.tokens import Account
from tests.gateway_run import GatewayRun, display_env
from tests.system import message_windows, mouse_location, require_program, wait_for
from tests.test_browser import browser  # noqa: F401 - the fixture
from tests.test_cockpit import admin_password, get


def _account(name: str = "ws01") -> Account:
    return Account(name, "localhost", f"/desktop/{name}", 1024, 5901, "secret12", 1)


# -- framebuffer grab against a small scripted RFB server -------------------------------------------


async def _fake_rfb_server(width: int, height: int, rows: list[bytes] | None):
    """An RFB 3.8 server without authentication that answers one update request with Raw rows."""
    seen: dict[str, bytes] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(bytes([1, rfb.SECURITY_NONE]))
        await reader.readexactly(1)
        writer.write(struct.pack(">I", 0))
        await reader.readexactly(1)  # ClientInit
        writer.write(struct.pack(">HH16sI", width, height, bytes(16), 4) + b"fake")
        await writer.drain()
        if rows is None:
            await reader.read()
            writer.close()
            return
        seen["pixel_format"] = await reader.readexactly(20)
        header = await reader.readexactly(4)
        seen["encodings"] = await reader.readexactly(4 * struct.unpack(">xxH", header)[0])
        seen["request"] = await reader.readexactly(10)
        writer.write(b"\x02")  # a Bell before the update is skipped
        writer.write(struct.pack(">BxH", 0, len(rows)))
        for y, row in enumerate(rows):
            writer.write(struct.pack(">HHHHi", 0, y, width, 1, 0) + row)
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_grab_reads_raw_rectangles_in_rgbx() -> None:
    rows = [bytes([255, 0, 0, 0, 0, 255, 0, 0, 0, 0, 255, 0]), bytes([9, 9, 9, 0] * 3)]
    server, port, seen = await _fake_rfb_server(3, 2, rows)
    async with server:
        frame = await rfb.grab_tcp("127.0.0.1", port, None, timeout_s=5)
    assert (frame.width, frame.height) == (3, 2)
    assert frame.pixels == rows[0] + rows[1]
    assert seen["encodings"] == struct.pack(">i", 0)  # Raw only
    bpp, depth, big_endian, true_colour = seen["pixel_format"][4:8]
    assert (bpp, depth, big_endian, true_colour) == (32, 24, 0, 1)
    assert seen["request"] == struct.pack(">BBHHHH", 3, 0, 0, 0, 3, 2)  # the whole screen, non-incremental


async def test_grab_refuses_a_huge_screen_and_keeps_to_its_deadline() -> None:
    server, port, _ = await _fake_rfb_server(60000, 60000, None)
    async with server:
        with pytest.raises(rfb.RfbError, match="refusing"):
            await rfb.grab_tcp("127.0.0.1", port, None, timeout_s=5)
    server, port, _ = await _fake_rfb_server(4, 4, [])  # never sends the update
    async with server:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await rfb.grab_tcp("127.0.0.1", port, None, timeout_s=0.5)
        assert time.monotonic() - started < 2


# -- idle policy --------------------------------------------------------------------------------------


def test_idle_config_is_validated() -> None:
    config = parse_config("idle:\n  after_minutes_without_viewers: 0.05\n  action: stop\n")
    assert config.idle.after_minutes_without_viewers == 0.05 and config.idle.event_action == "none"
    with pytest.raises(InputError, match="idle.action"):
        parse_config("idle:\n  action: reboot\n")
    with pytest.raises(InputError, match="idle.event_end"):
        parse_config("idle:\n  event_start: 2026-11-27T09:00:00+01:00\n  event_end: 2026-11-27T08:00:00+01:00\n")
    with pytest.raises(InputError, match="wall.thumbnail_size"):
        parse_config("wall:\n  thumbnail_size: big\n")


def test_idle_policy_event_window_and_typing() -> None:
    config = IdleConfig(after_minutes_without_viewers=10, action="stop",
                        event_start="2026-11-27T09:00:00+00:00", event_end="2026-11-27T17:00:00+00:00")
    policy = IdlePolicy(config, input_known=False)
    inside = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.timezone.utc).timestamp()
    outside = datetime.datetime(2026, 11, 27, 18, 0, tzinfo=datetime.timezone.utc).timestamp()
    assert policy.action_at(inside) == "none"  # the default during the event: nothing
    assert policy.action_at(outside) == "stop"
    slot = DesktopSlot(_account())
    decision = policy.decide(slot, no_viewers_since=1000.0, active_since=400.0)
    assert decision is not None and decision.deadline == 1600.0
    assert policy.decide(slot, no_viewers_since=None, active_since=400.0) is None  # a viewer is there
    slot.last_input_at = outside - 5
    assert policy.typing(slot, outside)


async def test_idle_watcher_warns_acts_and_spares_a_typing_viewer(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "gateway.db")
    typing, quiet = DesktopSlot(_account("ws01")), DesktopSlot(_account("ws02"))
    for slot in (typing, quiet):
        slot.set(Phase.READY)
        slot.ready_since = 0.0
    acted: list[tuple[str, str]] = []
    notices: list[str] = []

    async def act(account: str, action: str) -> str:
        acted.append((account, action))
        return f"{action} requested"

    async def notify(account: str, text: str) -> None:
        notices.append(account)

    # No viewer is counted (as when a proxy can't see them), but ws01's viewer types (builtin relay).
    watcher = IdleWatcher(IdleConfig(after_minutes_without_viewers=1, warn_minutes_before=0.5, action="stop"),
                          {"ws01": typing, "ws02": quiet}, store, act=act, notify=notify,
                          count_viewers=lambda slot, connections: 0, input_known=True)
    await watcher.check(10.0)  # idle from now on: deadline 70, warning from 40
    assert notices == [] and acted == []
    typing.last_input_at = 44.0
    await watcher.check(45.0)
    assert notices == ["ws02"] and acted == []  # ws01 is spared: typing
    typing.last_input_at = 73.0
    await watcher.check(74.0)  # past the deadline, but ws02 was warned only 29 s ago
    assert acted == []
    await watcher.check(76.0)
    assert acted == [("ws02", "stop")]  # ws01 still typing: never stopped
    await watcher.check(200.0)  # ws01 quiet at last: warned first...
    assert notices == ["ws02", "ws01"] and acted == [("ws02", "stop")]
    await watcher.check(231.0)  # ...then stopped
    assert acted == [("ws02", "stop"), ("ws01", "stop")]
    kinds = [(account, kind) for _, account, kind, _ in store.events()]
    assert ("ws01", "idle:spared") in kinds
    assert kinds.index(("ws02", "idle:warn")) < kinds.index(("ws02", "idle:stop"))
    store.close()


def test_metrics_report_input_age_and_slurm_job_states() -> None:
    slots = {}
    for name, state in (("ws01", "RUNNING"), ("ws02", "RUNNING"), ("ws03", "PENDING")):
        slot = DesktopSlot(_account(name), backend="slurm")
        slot.detail = {"job_id": "1", "job_state": state}
        slots[name] = slot
    slots["ws01"].set(Phase.READY)
    slots["ws01"].last_input_at = time.time() - 30
    metrics = GatewayMetrics()
    metrics.attach(slots)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    ages = {s.labels["account"]: s.value for s in families["gateway_desktop_last_input_age_seconds"].samples}
    assert set(ages) == {"ws01"} and 29 <= ages["ws01"] < 40
    jobs = {s.labels["state"]: s.value for s in families["gateway_slurm_jobs"].samples}
    assert jobs == {"PENDING": 1, "RUNNING": 2}


# -- on a real gateway -----------------------------------------------------------------------------------

VIEWER_CONFIG_RE = re.compile(rb'<script type="application/json" id="viewer-config">(.*?)</script>')


def _viewer_config(page: bytes) -> dict:
    match = VIEWER_CONFIG_RE.search(page)
    assert match, page[:500]
    return json.loads(match.group(1))


def _display(run: GatewayRun, account_id: str) -> dict[str, str]:
    """What an X client needs to open the account's display (DISPLAY and its XAUTHORITY cookie)."""
    return display_env(run.state_dir, account_id)


def _events(run: GatewayRun, password: str) -> list[dict]:
    code, body = get(run.url + "admin/api/audit", "admin", password)
    assert code == 200
    return json.loads(body)["events"]


@pytest.mark.system
def test_watch_page_is_view_only_and_share_links_expire(gateway_factory, browser) -> None:  # noqa: F811
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    password = admin_password(run)
    (account,) = run.accounts
    view_only = (run.state_dir / "secrets" / f"{account.id}.viewonly").read_text().strip()
    display = _display(run, account.id)

    code, _ = get(run.url + f"admin/watch/{account.id}", account.id, account.password)
    assert code == 401
    request_url = run.url + f"admin/watch/{account.id}"
    import urllib.request
    from base64 import b64encode

    request = urllib.request.Request(request_url)
    request.add_header("Authorization", "Basic " + b64encode(f"admin:{password}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Cache-Control"] == "no-store"
        page = response.read()
    config = _viewer_config(page)
    assert config["view_only"] is True and config["password"] == view_only
    assert account.password.encode() not in page

    # The pointer is somewhere known; then the instructor's viewer connects by itself and tries to move it.
    subprocess.run([require_program("xdotool"), "mousemove", "100", "100"], check=True, timeout=10, env=display)
    assert mouse_location(display) == (100, 100)
    context = browser.new_context(http_credentials={"username": "admin", "password": password},
                                  viewport={"width": 1280, "height": 900})
    watch = context.new_page()
    watch.goto(request_url)
    watch.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    assert watch.evaluate("() => window.gatewayViewer.rfb.viewOnly") is True
    assert watch.is_hidden("#login") and watch.is_hidden("#key-ctrl-alt-del") and watch.is_hidden("#toggle-clipboard")
    box = watch.locator("#screen canvas").bounding_box()
    assert box is not None and box["width"] > 100
    # Even with noVNC's own guard switched off, the desktop ignores what the view-only password sends.
    watch.evaluate("() => { window.gatewayViewer.rfb.viewOnly = false; }")
    for dx, dy in ((50, 50), (300, 200), (400, 300)):
        watch.mouse.move(box["x"] + dx, box["y"] + dy)
        watch.mouse.click(box["x"] + dx, box["y"] + dy)
    time.sleep(0.5)
    assert mouse_location(display) == (100, 100)
    watch.close()

    # The same moves from a participant's viewer (full password) do move the pointer.
    participant = browser.new_page(viewport={"width": 1280, "height": 900})
    participant.goto(run.url + f"view/{account.id}")
    participant.fill("#password", account.password)
    participant.click("#connect")
    participant.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    box = participant.locator("#screen canvas").bounding_box()
    participant.mouse.move(box["x"] + 300, box["y"] + 200)
    participant.mouse.move(box["x"] + 310, box["y"] + 210)
    assert wait_for(lambda: mouse_location(display) != (100, 100), timeout_s=5)
    participant.close()

    # Share links: admin only, JSON only; the link works without credentials until it expires.
    share = run.url + f"admin/api/desktops/{account.id}/share"
    code, _ = get(share, account.id, account.password, method="POST", body=b"{}", content_type="application/json")
    assert code == 401
    code, _ = get(share, "admin", password, method="POST", body=b"minutes=5",
                  content_type="application/x-www-form-urlencoded")
    assert code == 415
    code, _ = get(share, "admin", password, method="POST", body=b'{"minutes": -1}', content_type="application/json")
    assert code == 400
    code, body = get(share, "admin", password, method="POST", body=b'{"minutes": 0.03}',
                     content_type="application/json")
    assert code == 200, body
    link = json.loads(body)["path"]
    assert link.startswith("watch/")
    with urllib.request.urlopen(run.url + link, timeout=10) as response:
        assert response.headers["Cache-Control"] == "no-store"
        shared = response.read()
    config = _viewer_config(shared)
    assert config["view_only"] is True and config["password"] == view_only and config["root"] == "../"
    assert account.password.encode() not in shared
    # Only the token's hash is stored.
    store = StateStore(run.state_dir / "gateway.db")
    token = link.removeprefix("watch/")
    assert not any(token in str(row) for row in store.query("SELECT * FROM watch_links"))
    store.close()
    code, _ = get(run.url + "watch/not-a-token-anyone-made", "", "")
    assert code == 404
    time.sleep(max(0.0, json.loads(body)["expires_at"] - time.time()) + 0.2)
    code, _ = get(run.url + link, "", "")
    assert code == 410
    kinds = {e["kind"] for e in _events(run, password) if e["account"] == account.id}
    assert {"admin:watch", "admin:share", "watch-link:open"} <= kinds
    assert run.terminate() == 0


def _accepted_connections(run: GatewayRun, account_id: str) -> int:
    text = (run.state_dir / "logs" / f"{account_id}.xvnc.log").read_text(errors="replace")
    return text.count("Connections: accepted")


@pytest.mark.system
def test_wall_thumbnails_are_grabbed_only_while_the_wall_is_open(gateway_factory) -> None:
    from PIL import Image

    run: GatewayRun = gateway_factory(count=2, config_text="wall:\n  thumbnail_size: 160x100\n  interval_s: 0.5\n")
    run.up()
    password = admin_password(run)
    first = run.accounts[0]
    time.sleep(2)  # the wall is closed: nobody grabs
    before = _accepted_connections(run, first.id)
    time.sleep(2)
    assert _accepted_connections(run, first.id) == before

    code, _ = get(run.url + "admin/wall", first.id, first.password)
    assert code == 401
    code, page = get(run.url + "admin/wall", "admin", password)
    assert code == 200 and b"wall.js" in page
    code, _ = get(run.url + f"admin/api/thumbnail/{first.id}.png", first.id, first.password)
    assert code == 401
    code, png = get(run.url + f"admin/api/thumbnail/{first.id}.png", "admin", password)
    assert code == 200
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (160, 100)
    colours = image.convert("RGB").getcolors(maxcolors=160 * 100)
    assert colours is not None and len(colours) > 1, "the thumbnail is a single colour"
    code, _ = get(run.url + "admin/api/thumbnail/nobody.png", "admin", password)
    assert code == 404

    # While the wall keeps asking, the desktop is grabbed again and again (shared, view-only).
    started = _accepted_connections(run, first.id)
    for _ in range(6):
        assert get(run.url + f"admin/api/thumbnail/{run.accounts[1].id}.png", "admin", password)[0] == 200
        time.sleep(0.5)
    assert _accepted_connections(run, first.id) >= started + 3
    # The wall closed: grabbing stops after a few intervals.
    time.sleep(3)
    stopped = _accepted_connections(run, first.id)
    time.sleep(2)
    assert _accepted_connections(run, first.id) == stopped
    assert run.status()[first.id]["state"] == "ready"
    assert run.terminate() == 0


@pytest.mark.system
async def test_idle_desktop_is_warned_then_stopped_unless_watched(gateway_factory) -> None:
    import aiohttp

    config = ("idle:\n  after_minutes_without_viewers: 0.1\n  warn_minutes_before: 0.05\n"
              "  action: stop\n  check_interval_s: 0.5\n")
    run: GatewayRun = gateway_factory(count=2, config_text=config)
    run.up()
    password = admin_password(run)
    watched, idle = run.accounts
    idle_display = _display(run, idle.id)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(run.ws_url(watched), protocols=("binary",))
        await ws.receive(timeout=5)  # the RFB banner: a viewer is connected

        def warned() -> bool:
            return any(e["kind"] == "idle:warn" and e["account"] == idle.id for e in _events(run, password))

        assert await asyncio.to_thread(wait_for, warned, 15)
        # The warning is shown inside the desktop, and the desktop still runs for now.
        assert await asyncio.to_thread(wait_for, lambda: message_windows(idle_display), 3)
        assert run.status()[idle.id]["state"] == "ready"
        assert await asyncio.to_thread(wait_for, lambda: run.status()[idle.id]["state"] == "stopped", 15)
        events = [e for e in _events(run, password) if e["account"] == idle.id]
        kinds = [e["kind"] for e in events]
        assert kinds.index("idle:warn") < kinds.index("idle:stop")
        warn_at = next(e["at"] for e in events if e["kind"] == "idle:warn")
        stop_at = next(e["at"] for e in events if e["kind"] == "idle:stop")
        assert stop_at - warn_at >= 3.0  # warn_minutes_before
        # The watched desktop is left alone as long as its viewer stays.
        await asyncio.sleep(4)
        assert run.status()[watched.id]["state"] == "ready"
        assert not any(e["account"] == watched.id and e["kind"].startswith("idle:") for e in _events(run, password))
        await ws.close()
    assert run.terminate() == 0


@pytest.mark.system
async def test_builtin_relay_reports_input_age(gateway_factory) -> None:
    import aiohttp

    run: GatewayRun = gateway_factory(count=1, config_text="proxy:\n  mode: builtin\n")
    run.up()
    password = admin_password(run)
    (account,) = run.accounts
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(run.ws_url(account), protocols=("binary",))
        stream = rfb.WebSocketStream(ws)
        await rfb.handshake(stream, stream, account.password)
        stream.write(struct.pack(">BBHH", 5, 0, 200, 150))  # a PointerEvent
        await stream.drain()
        await asyncio.sleep(0.5)

        def input_age() -> float | None:
            code, body = get(run.url + "metrics", "admin", password)
            assert code == 200
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            samples = families["gateway_desktop_last_input_age_seconds"].samples
            return next((s.value for s in samples if s.labels["account"] == account.id), None)

        def sampled_age() -> float | None:
            deadline = time.monotonic() + 5
            while (value := input_age()) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            return value

        # A sample must appear (no sample means the relay never saw the input), and it is recent.
        age = await asyncio.to_thread(sampled_age)
        assert isinstance(age, float), f"no input-age sample for {account.id}: {age!r}"
        assert 0 <= age < 10, age
        # With no further input the age grows: it measures the time since the input, not a constant.
        await asyncio.sleep(1.5)
        later = await asyncio.to_thread(sampled_age)
        assert isinstance(later, float) and later >= age + 1.0, (age, later)
        await ws.close()
    assert run.terminate() == 0
