"""The organiser's cockpit: status rows, Prometheus metrics, the admin page and the control socket.

Three ways in, one source of truth (the supervisor's live desktop records):

* ``gateway status [--json]`` talks to the running gateway over a Unix socket in the state dir
  (mode 0600 inside a 0700 directory: only the gateway's own user can use it);
* the admin page (``/admin``, HTTP Basic with the admin credential, never a participant's);
* ``/metrics`` in Prometheus text format, behind the same admin credential.

Actions (restart, stop, start, disconnect) are requests to the supervisor; every one is written to
the audit log in the state database with who asked, from where, and when.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.common.files import read_or_create_secret
from gateway.common.netstat import established_by_remote
from gateway.model.actions import ORGANISER_ACTION_NAMES
from gateway.model.config import Config
from gateway.model.signups import claims
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase
from gateway.web.admin_access import check_admin
from gateway.web.context import client_address_of, render_page
from gateway.web.thumbnails import ThumbnailService

__all__ = [
    "COCKPIT",
    "Cockpit",
    "GatewayMetrics",
    "status_rows",
    "add_admin_routes",
    "make_control_app",
    "load_or_create_admin_password",
    "admin_password_path",
    "fetch_status",
]

#: Each handler's route is written above it, in the order they are matched.
_routes = web.RouteTableDef()

log = logging.getLogger("gateway.cockpit")

ActFunction = Callable[[str, str], Awaitable[str]]
#: Gateway.extend: (seconds, accounts or None for all, who asked) -> one line per thing done or refused.
ExtendFunction = Callable[[float, "list[str] | None", str], Awaitable[list[str]]]
#: The longest single `gateway extend` (a day).
MAX_EXTEND_S = 24 * 3600.0


class GatewayMetrics:
    """Counters the supervisor updates as things happen; gauges are computed at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.spawn_seconds = Histogram(
            "gateway_desktop_spawn_seconds", "Seconds from start to a successful RFB handshake",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=self.registry,
        )
        self.proxy_errors = Counter("gateway_proxy_errors", "Proxies that exited unexpectedly",
                                    ["account"], registry=self.registry)

    def attach(self, slots: Mapping[str, DesktopSlot]) -> None:
        self.registry.register(_SlotCollector(slots))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SlotCollector(Collector):
    def __init__(self, slots: Mapping[str, DesktopSlot]) -> None:
        self.slots = slots

    def collect(self):  # type: ignore[no-untyped-def]
        by_state = GaugeMetricFamily("gateway_desktops", "Desktops by state", labels=["state"])
        counts = {phase: 0 for phase in Phase}
        for slot in self.slots.values():
            counts[slot.phase] += 1
        for phase, count in counts.items():
            by_state.add_metric([phase.value], count)
        yield by_state
        viewers = GaugeMetricFamily("gateway_viewers", "Viewers connected now", labels=["account"])
        restarts = CounterMetricFamily("gateway_desktop_restarts", "Desktop restarts", labels=["account"])
        connections = established_by_remote()
        for slot in self.slots.values():
            viewers.add_metric([slot.account.id], viewer_count(slot, connections))
            restarts.add_metric([slot.account.id], slot.restarts)
        yield viewers
        yield restarts
        # Input is seen by the builtin relay only: other modes leave last_input_at None (no sample).
        input_age = GaugeMetricFamily("gateway_desktop_last_input_age_seconds",
                                      "Seconds since a viewer last sent keyboard or mouse input", labels=["account"])
        jobs = GaugeMetricFamily("gateway_slurm_jobs", "Slurm desktop jobs by job state", labels=["state"])
        job_states: dict[str, int] = {}
        now = time.time()
        for slot in self.slots.values():
            if slot.last_input_at is not None and slot.phase is Phase.READY:
                input_age.add_metric([slot.account.id], max(0.0, now - slot.last_input_at))
            state = slot.detail.get("job_state")
            if slot.backend == "slurm" and state:
                job_states[state] = job_states.get(state, 0) + 1
        for state, count in sorted(job_states.items()):
            jobs.add_metric([state], count)
        yield input_age
        yield jobs


def viewer_count(slot: DesktopSlot, connections: Mapping[tuple[str, int], int]) -> int:
    """Viewers of this desktop: this host's connections to its VNC server (every proxy mode makes one
    per viewer), or what the builtin relay counted itself, whichever knows more."""
    counted = 0
    if slot.endpoint is not None and slot.phase is Phase.READY:
        host = slot.endpoint_ip or slot.endpoint.host
        counted = connections.get((host, slot.endpoint.port), 0)
    return max(counted, slot.viewers)


def status_rows(slots: Mapping[str, DesktopSlot], now: float | None = None) -> list[dict[str, Any]]:
    """One row per account, as `gateway status --json` and the admin page show it."""
    now = time.time() if now is None else now
    connections = established_by_remote()
    rows = []
    for slot in slots.values():
        reason = slot.reason or ""
        if slot.output_tail:  # organisers only: what a desktop that ended printed last (no passwords)
            reason = f"{reason}; last output: {slot.output_tail}" if reason else f"last output: {slot.output_tail}"
        rows.append({
            "account": slot.account.id,
            "backend": slot.backend,
            "protocol": slot.protocol,
            "host": slot.endpoint.host if slot.endpoint else None,
            "port": slot.endpoint.port if slot.endpoint else None,
            "state": slot.phase.value,
            "reason": reason or None,
            "output_tail": slot.output_tail or None,
            "ends_at": slot.ends_at,
            "job_id": slot.detail.get("job_id"),
            "uptime_s": round(now - slot.ready_since, 1) if slot.ready_since else None,
            "restarts": slot.restarts,
            "viewers": viewer_count(slot, connections),
            "last_input_at": slot.last_input_at,
        })
    return rows


@dataclass
class Cockpit:
    """What the cockpit needs from the running gateway."""

    slots: Mapping[str, DesktopSlot]
    store: StateStore
    act: ActFunction
    metrics: GatewayMetrics
    admin_user: str
    admin_password: str
    #: The wall of thumbnails and the state dir (view-only passwords); None in small test setups.
    thumbnails: ThumbnailService | None = None
    state_dir: Path | None = None
    #: What confines each local desktop (its user, limits), for `gateway status`.
    isolation: str = ""
    #: `gateway extend` and the admin page's Extend (None: this gateway cannot extend).
    extend: ExtendFunction | None = None

    def record(self, actor: str, action: str, account: str, result: str) -> None:
        self.store.record_event(f"admin:{action}", account, f"by {actor}: {result}")


COCKPIT = web.AppKey("cockpit", Cockpit)

# -- admin credential --------------------------------------------------------------------------------


def admin_password_path(config: Config, state_dir: Path) -> Path:
    """Where the admin password is: ``admin.password_file``, else made in the state dir's secrets."""
    configured = config.admin.password_file
    return Path(configured) if configured else state_dir / "secrets" / "admin.password"


def load_or_create_admin_password(path: Path) -> str:
    """The admin password from ``path``; a random one is made (0600) the first time."""

    def make() -> str:
        log.info("admin password created path=%s", path)
        return secrets.token_urlsafe(12)

    return read_or_create_secret(path, make)


# -- admin pages ------------------------------------------------------------------------------------


def add_admin_routes(app: web.Application) -> None:
    """The admin page, its APIs and /metrics (the app needs :data:`COCKPIT` and the admin credential).

    The watch and wall routes (the factory adds them) come first: the generic action route
    (``admin_action``) would take their POSTs too."""
    app.router.add_routes(_routes)


@_routes.get("/admin/")
async def admin_page(request: web.Request) -> web.Response:
    check_admin(request)
    return render_page(request, "admin.html.j2", "../")


@_routes.get("/admin")
async def admin_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("admin/")


def admin_rows(cockpit: Cockpit) -> list[dict[str, Any]]:
    """The status rows with who signed up for each account (the admin page's Participant column)."""
    by_account = {c.account: {"name": c.name, "email": c.email} for c in claims(cockpit.store)}
    return [dict(row, participant=by_account.get(row["account"])) for row in status_rows(cockpit.slots)]


@_routes.get("/admin/api/desktops")
async def admin_desktops(request: web.Request) -> web.Response:
    check_admin(request)
    return web.json_response({"desktops": admin_rows(request.app[COCKPIT])},
                             headers={"Cache-Control": "no-store"})


@_routes.get("/admin/events")
async def admin_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the status rows every two seconds while the page is open."""
    check_admin(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    cockpit = request.app[COCKPIT]
    try:
        while True:
            payload = json.dumps({"desktops": admin_rows(cockpit), "at": time.time()})
            await response.write(f"data: {payload}\n\n".encode())
            await asyncio.sleep(2)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response


@_routes.get("/admin/api/audit")
async def admin_audit(request: web.Request) -> web.Response:
    check_admin(request)
    events = request.app[COCKPIT].store.events()[-200:]
    return web.json_response({"events": [
        {"at": at, "account": account, "kind": kind, "detail": detail} for at, account, kind, detail in events
    ]})


@_routes.post("/admin/api/desktops/{account}/{action}")
async def admin_action(request: web.Request) -> web.Response:
    user = check_admin(request)
    # Browsers send Basic credentials with any request to this origin, forms from other sites
    # included; a JSON body needs a CORS preflight they won't get, so it is the CSRF guard.
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    cockpit = request.app[COCKPIT]
    account, action = request.match_info["account"], request.match_info["action"]
    if account not in cockpit.slots or action not in ORGANISER_ACTION_NAMES:
        raise web.HTTPNotFound(text="no such account or action")
    result = await cockpit.act(account, action)
    cockpit.record(f"{user}@{client_address_of(request)}", action, account, result)
    return web.json_response({"account": account, "action": action, "result": result})


def extend_request(body: object) -> tuple[float, list[str] | None]:
    """``{"minutes": N, "accounts": [...]}`` (accounts optional) as seconds and accounts; ValueError if bad."""
    if not isinstance(body, dict):
        raise ValueError("send {\"minutes\": N, \"accounts\": [...]}")
    minutes = body.get("minutes")
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes * 60 <= MAX_EXTEND_S:
        raise ValueError(f"minutes must be a number above 0 and at most {MAX_EXTEND_S / 60:g}")
    accounts = body.get("accounts")
    if accounts is not None and (not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts)
                                 or not accounts):
        raise ValueError("accounts must be a list of account names")
    return float(minutes) * 60.0, accounts


async def _run_extend(cockpit: Cockpit, body: object, actor: str) -> web.Response:
    if cockpit.extend is None:
        raise web.HTTPNotFound(text="this gateway cannot extend")
    try:
        seconds, accounts = extend_request(body)
        lines = await cockpit.extend(seconds, accounts, actor)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except LookupError as exc:
        return web.json_response({"error": str(exc).strip("'\"")}, status=404)
    return web.json_response({"minutes": seconds / 60, "lines": lines})


@_routes.post("/admin/api/extend")
async def admin_extend(request: web.Request) -> web.Response:
    """The admin page's Extend: the same as `gateway extend`, recorded with who asked from where."""
    user = check_admin(request)
    if request.content_type != "application/json":  # the CSRF guard, as for the other actions
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "send JSON"}, status=400)
    return await _run_extend(request.app[COCKPIT], body, f"{user}@{client_address_of(request)}")


@_routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    check_admin(request)
    return web.Response(body=request.app[COCKPIT].metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


# -- control socket -----------------------------------------------------------------------------------


def make_control_app(cockpit: Cockpit) -> web.Application:
    """The API behind `gateway status`, on a Unix socket only the gateway's user can open."""
    app = web.Application()
    app[COCKPIT] = cockpit

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"desktops": status_rows(cockpit.slots), "isolation": cockpit.isolation})

    async def action(request: web.Request) -> web.Response:
        account, name = request.match_info["account"], request.match_info["action"]
        if account not in cockpit.slots or name not in ORGANISER_ACTION_NAMES:
            raise web.HTTPNotFound(text="no such account or action")
        result = await cockpit.act(account, name)
        cockpit.record("control-socket", name, account, result)
        return web.json_response({"account": account, "action": name, "result": result})

    async def extend(request: web.Request) -> web.Response:
        return await _run_extend(cockpit, await request.json(), "control-socket")

    app.router.add_get("/status", status)
    app.router.add_post("/extend", extend)
    app.router.add_post("/desktops/{account}/{action}", action)
    return app


async def fetch_status(socket_path: Path) -> dict[str, Any]:
    """Ask the running gateway for its status: ``desktops`` (one row each) and ``isolation``."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get("http://gateway/status") as response:
            response.raise_for_status()
            return dict(await response.json())


async def request_action(socket_path: Path, account: str, action: str) -> str:
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(f"http://gateway/desktops/{account}/{action}") as response:
            if response.status == 404:
                raise LookupError(await response.text())
            response.raise_for_status()
            return str((await response.json())["result"])


async def request_extend(socket_path: Path, minutes: float, accounts: list[str] | None) -> dict[str, Any]:
    """Ask the running gateway to extend (see Gateway.extend); its answer, or ValueError/LookupError."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        body: dict[str, Any] = {"minutes": minutes}
        if accounts is not None:
            body["accounts"] = accounts
        async with session.post("http://gateway/extend", json=body) as response:
            answer = dict(await response.json())
            if response.status == 404:
                raise LookupError(answer.get("error", "not found"))
            if response.status != 200:
                raise ValueError(answer.get("error", f"HTTP {response.status}"))
            return answer
