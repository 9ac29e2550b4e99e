"""The organiser's cockpit on a real gateway: `gateway status`, /metrics, the admin page and its
actions (with an audit record each), and view-only passwords."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.common import rfb
from gateway.model.state import StateStore
from tests.gateway_run import GatewayRun, display_env
from tests.system import mouse_location, wait_for

pytestmark = pytest.mark.system


def get(url: str, user: str, password: str, *, method: str = "GET", body: bytes | None = None,
        content_type: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=body)
    request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def admin_password(run: GatewayRun) -> str:
    path = run.state_dir / "secrets" / "admin.password"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    return path.read_text().strip()


def test_status_reflects_a_killed_desktop(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=2)
    run.up()
    rows = run.status()
    assert set(rows) == {a.id for a in run.accounts}
    first = run.accounts[0]
    assert rows[first.id]["state"] == "ready"
    assert rows[first.id]["backend"] == "local" and rows[first.id]["protocol"] == "vnc"
    assert rows[first.id]["port"] == first.vnc_port
    store = StateStore(run.state_dir / "gateway.db")
    xvnc = store.desktops()[first.id].state["xvnc"]["pid"]
    store.close()
    os.kill(xvnc, signal.SIGKILL)
    killed_at = time.monotonic()
    # The restart may be quicker than one `gateway status` call, so look for its trace: either the
    # desktop is seen down, or it is seen back with one restart counted.
    noticed = wait_for(lambda: (row := run.status()[first.id])["state"] != "ready" or row["restarts"] == 1,
                       timeout_s=15, interval_s=0.1)
    assert noticed, "gateway status did not notice the killed desktop"
    assert time.monotonic() - killed_at < 15
    assert wait_for(lambda: run.status()[first.id]["state"] == "ready" and run.status()[first.id]["restarts"] == 1)
    assert run.terminate() == 0


async def test_viewers_are_counted(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    (account,) = run.accounts
    import aiohttp

    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(run.ws_url(account), protocols=("binary",))
        await ws.receive(timeout=5)  # the RFB banner: the tunnel to the desktop is open
        assert await asyncio.to_thread(wait_for, lambda: run.status()[account.id]["viewers"] == 1)
        await ws.close()
    assert await asyncio.to_thread(wait_for, lambda: run.status()[account.id]["viewers"] == 0)
    assert run.terminate() == 0


def test_metrics_and_admin_page(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=2)
    run.up()
    password = admin_password(run)
    participant = run.accounts[0]

    code, _ = get(run.url + "metrics", participant.id, participant.password)
    assert code == 401
    code, body = get(run.url + "metrics", "admin", password)
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    by_state = {s.labels["state"]: s.value for s in families["gateway_desktops"].samples}
    assert by_state["ready"] == 2 and by_state["failed"] == 0
    assert "gateway_desktop_spawn_seconds" in families

    code, _ = get(run.url + "admin/", participant.id, participant.password)
    assert code == 401
    code, page = get(run.url + "admin/", "admin", password)
    assert code == 200 and b"Desktops" in page
    assert participant.password.encode() not in page

    # Actions need admin credentials and JSON (a cross-site form can't send it), and are audited.
    url = run.url + f"admin/api/desktops/{participant.id}/restart"
    code, _ = get(url, participant.id, participant.password, method="POST", body=b"{}", content_type="application/json")
    assert code == 401
    code, _ = get(url, "admin", password, method="POST", body=b"a=b", content_type="application/x-www-form-urlencoded")
    assert code == 415
    store = StateStore(run.state_dir / "gateway.db")
    before = store.desktops()[participant.id].state["xvnc"]["pid"]
    store.close()
    code, body = get(url, "admin", password, method="POST", body=b"{}", content_type="application/json")
    assert code == 200, body

    def restarted() -> bool:
        store = StateStore(run.state_dir / "gateway.db")
        try:
            record = store.desktops().get(participant.id)
            return record is not None and record.state["xvnc"]["pid"] != before
        finally:
            store.close()

    assert wait_for(restarted)
    assert wait_for(lambda: run.status()[participant.id]["state"] == "ready")
    code, body = get(run.url + "admin/api/audit", "admin", password)
    events = json.loads(body)["events"]
    assert any(e["kind"] == "admin:restart" and e["account"] == participant.id and "admin@" in e["detail"]
               for e in events)

    # Stop and start through the control socket, as `gateway desktop` does.
    result = subprocess.run([sys.executable, "-m", "gateway", "desktop", "stop", participant.id,
                             "--state-dir", str(run.state_dir)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: run.status()[participant.id]["state"] == "stopped")
    subprocess.run([sys.executable, "-m", "gateway", "desktop", "start", participant.id,
                    "--state-dir", str(run.state_dir)], check=True, capture_output=True, timeout=30)
    assert wait_for(lambda: run.status()[participant.id]["state"] == "ready")
    assert run.terminate() == 0


async def test_view_only_password_watches_but_cannot_touch(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=1)
    run.up()
    (account,) = run.accounts
    view_only = (run.state_dir / "secrets" / f"{account.id}.viewonly").read_text().strip()
    assert view_only != account.password
    display = display_env(run.state_dir, account.id)

    async with rfb.open_tcp("127.0.0.1", account.vnc_port, account.password, timeout_s=10) as full:
        await full.pointer_event(100, 100)
        await asyncio.sleep(0.5)
    assert await asyncio.to_thread(mouse_location, display) == (100, 100)

    async with rfb.open_tcp("127.0.0.1", account.vnc_port, view_only, timeout_s=10) as watcher:
        assert watcher.session.width == 1280
        await watcher.pointer_event(300, 200)
        await asyncio.sleep(0.5)
    assert await asyncio.to_thread(mouse_location, display) == (100, 100)  # ignored

    # The view-only password also works through Apache, like any viewer's.
    await rfb.connect_websocket(run.ws_url(account), view_only, timeout_s=10)
    assert run.terminate() == 0


def test_admin_live_updates_pass_through_apache_unbuffered(gateway_factory) -> None:
    import socket

    run: GatewayRun = gateway_factory(count=1)
    run.up()
    password = admin_password(run)
    credentials = b64encode(f"admin:{password}".encode()).decode()
    with socket.create_connection(("127.0.0.1", run.listen_port), timeout=10) as sock:
        sock.sendall(f"GET /admin/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {credentials}\r\n\r\n".encode())
        received = b""
        started = time.monotonic()
        while b"data: " not in received and time.monotonic() - started < 5:
            received += sock.recv(65536)
    assert b"text/event-stream" in received
    assert b'"state": "ready"' in received
    assert time.monotonic() - started < 5
    assert "AH01146" not in (run.state_dir / "apache" / "logs" / "error.log").read_text()
    assert run.terminate() == 0
