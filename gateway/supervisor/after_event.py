"""After the event: `gateway up TOKENS --after-event` serves the participants' downloads, nothing else.

It starts no desktop, no proxy and no Slurm job, and touches no backend: it serves the landing page
(saying that the event is over and until when files can be fetched), sign-in, ``/me`` and
``GET /archive/ACCOUNT`` (the same authentication and Range support as during the event), the admin
page and ``/metrics``, behind the same front (the private Apache, or ``apache.mode``) as ``gateway
up``. Every desktop is shown as stopped. It holds the state dir's lock like ``gateway up``, so it
runs as the event's systemd unit with ``--after-event`` added, for as long as downloads are offered.

:func:`downloads_line` is what ``gateway down`` prints last: what is still offered, and how.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from gateway.model.archive import archive_records
from gateway.backends.base import BackendError, Endpoint
from gateway.web.cockpit import GatewayMetrics
from gateway.model.config import Config, load_config, parse_listen
from gateway.model.errors import UserError
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.proxies.websockify import ProxyMode, RunningProxy
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase
from gateway.supervisor.gateway import Gateway, GatewayOptions, port_is_free
from gateway.model.tokens import Account, TokenFile
from gateway.web.app import TEMPLATES

__all__ = ["AfterEventGateway", "after_event_problems", "downloads_line", "record_invocation", "EVENT_OVER"]

log = logging.getLogger("gateway.after_event")

#: Every desktop's reason while only downloads are served.
EVENT_OVER = "the event is over"
#: In the state dir: how `gateway up` was last run (token file, config), for `gateway down`'s last line.
INVOCATION_RECORD = "last-up.json"


class _NoProxies(ProxyMode):
    """No desktop runs after the event, so no websocket reaches one."""

    name = "none"

    def routes(self, accounts: Sequence[Account]) -> list:  # type: ignore[type-arg]
        return []

    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        raise RuntimeError("no desktops run after the event")


def after_event_problems(config: Config) -> list[str]:
    """Why --after-event would serve nothing useful (checked before anything starts)."""
    if not config.archive.enabled:
        return ["--after-event serves the participants' archives: set archive.enabled: true (and pack them "
                "with `gateway archive TOKENS`)"]
    return []


def until_text(config: Config) -> str:
    return f"until {config.archive.expires}" if config.archive.expires else "with no end date (archive.expires)"


def landing_notice(config: Config) -> str:
    """What the pages say at the top while only downloads are served."""
    until = f"until {config.archive.expires}" if config.archive.expires else "for a while"
    return (f"The event is over and the desktops are gone. Your files can be downloaded {until}: "
            "sign in with your account and password to fetch them.")


class AfterEventGateway(Gateway):
    """The web front of :class:`Gateway` (pages, sign-in, archives, admin, metrics), without desktops."""

    def __init__(self, tokens: TokenFile, config: Config, options: GatewayOptions) -> None:
        # Not Gateway.__init__: that makes the backends and the proxy mode, and nothing of those may run.
        self.tokens = tokens
        self.config = config
        self.options = options
        self.state_dir = options.state_dir
        self.logs_dir = options.state_dir / "logs"
        self.slots = {a.id: DesktopSlot(a, phase=Phase.STOPPED, reason=EVENT_OVER, backend="none")
                      for a in tokens.accounts}
        self.backends = {}
        self.proxy_mode = _NoProxies()
        self.metrics = GatewayMetrics()
        self.thumbnails = None  # type: ignore[assignment]
        self.watchers = {}
        self.cockpit = None
        self.changed = asyncio.Event()
        self.store = None
        self.apache = None
        self.web_port = None
        self.idle = None

    async def act(self, account_id: str, action: str) -> str:
        if account_id not in self.slots:
            raise LookupError(f"no desktop {account_id}")
        return f"nothing to do: {EVENT_OVER} (only downloads are served)"

    async def set_keyboard_layout(self, account_id: str, layout: str) -> None:
        raise BackendError(EVENT_OVER)

    async def extend(self, seconds: float, accounts: list[str] | None, actor: str) -> list[str]:
        return [f"nothing to extend: {EVENT_OVER} (downloads are offered {until_text(self.config)})"]

    def customise_app(self, app: web.Application) -> None:
        app[TEMPLATES].globals["after_event"] = landing_notice(self.config)

    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[str], None] | None = None) -> None:
        ensure_private_dir(self.state_dir)
        self.logs_dir.mkdir(exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            self.store = StateStore(self.state_dir / "gateway.db")
            stack.callback(self.store.close)
            self._refuse_running_desktops()
            await self._clean_stale_services()
            host, port = parse_listen(self.options.listen)
            if not port_is_free(host, port):
                raise UserError(f"--listen {self.options.listen}: the port is already in use")
            self.cockpit = self._make_cockpit()
            await self._start_control(stack)
            await self._start_web(stack)
            await self._start_front(stack)
            self.store.record_event("after-event:up", None, f"downloads served at {self.url}")
            if on_ready is not None:
                on_ready(self._announcement())
            async with asyncio.TaskGroup() as group:
                keeper = group.create_task(self._keep_apache()) if self.apache is not None else None
                await stop.wait()
                if keeper is not None:
                    keeper.cancel()
            self.store.record_event("after-event:down", None, "")

    def _refuse_running_desktops(self) -> None:
        assert self.store is not None
        left = sorted(self.store.desktops())
        if left:
            raise UserError(f"desktops of the event are still recorded ({', '.join(left[:5])}"
                            f"{', ...' if len(left) > 5 else ''}): stop them with `gateway down` first")

    def _announcement(self) -> str:
        assert self.store is not None
        packed = {r.account for r in archive_records(self.store)}
        count = sum(1 for account in self.slots if account in packed)
        return (f"After the event: {count} of {len(self.slots)} archives offered for download "
                f"{until_text(self.config)}; no desktops run.\nLanding page: {self.url}")


# -- what `gateway down` says last -------------------------------------------------------------------


def record_invocation(state_dir: Path, tokens: Path, config: Path | None) -> None:
    """Remember the token file and config of this `gateway up`, for `gateway down`'s advice."""
    data = {"tokens": str(tokens.resolve()), "config": str(config.resolve()) if config else None,
            "at": time.time()}
    atomic_write(state_dir / INVOCATION_RECORD, json.dumps(data) + "\n", mode=0o600)


def _invocation(state_dir: Path) -> dict[str, str | None]:
    try:
        data = json.loads((state_dir / INVOCATION_RECORD).read_text())
        return {"tokens": str(data["tokens"]), "config": data.get("config")}
    except (OSError, ValueError, KeyError, TypeError):
        return {"tokens": "TOKENS", "config": None}


def downloads_line(state_dir: Path, config_path: Path | None) -> str:
    """One line: which downloads remain on offer after `gateway down`, and the command that serves them.

    The config is ``config_path``, else the one the last `gateway up` was given (for archive.expires).
    """
    store_path = state_dir / "gateway.db"
    if not store_path.exists():
        return "Nothing remains offered: this state dir has no archives."
    store = StateStore(store_path)
    try:
        count = len(archive_records(store))
    finally:
        store.close()
    if not count:
        return ("Nothing remains offered: no archives were packed (`gateway archive TOKENS`, then "
                "`gateway up TOKENS --after-event` serves them).")
    recorded = _invocation(state_dir)
    config_arg = str(config_path) if config_path else recorded["config"]
    try:
        config = load_config(config_arg)
    except UserError:
        config = load_config(None)
    command = f"gateway up {recorded['tokens']} --after-event" + (f" --config {config_arg}" if config_arg else "")
    command += f" --state-dir {state_dir}"
    if not config.archive.enabled:
        return (f"{count} archives are packed; with archive.enabled: true, downloads remain available with "
                f"`{command}` {until_text(config)}.")
    return f"Downloads ({count} archives) remain available with `{command}` {until_text(config)}."
