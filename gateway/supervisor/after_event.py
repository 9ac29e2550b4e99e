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
from collections.abc import Callable
from pathlib import Path

from gateway.backends.base import BackendError
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.model.archive import archive_records
from gateway.model.config import Config, load_config, parse_listen
from gateway.model.errors import UserError
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase
from gateway.model.tokens import TokenFile
from gateway.proxies.apache import novnc_dir
from gateway.supervisor.front import WebFront, gateway_url, port_is_free
from gateway.supervisor.gateway import GatewayOptions
from gateway.supervisor.recover import STATE_DB, open_state_store, stop_leftover_services
from gateway.web.app import TEMPLATES, make_app
from gateway.web.cockpit import GatewayMetrics

__all__ = ["AfterEventGateway", "after_event_problems", "downloads_line", "record_invocation", "EVENT_OVER"]

log = logging.getLogger("gateway.after_event")

#: Every desktop's reason while only downloads are served.
EVENT_OVER = "the event is over"
#: In the state dir: how `gateway up` was last run (token file, config), for `gateway down`'s last line.
INVOCATION_RECORD = "last-up.json"


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


class AfterEventGateway:
    """The web front of :class:`~gateway.supervisor.gateway.Gateway` (pages, sign-in, archives, admin,
    metrics), without desktops: it makes no backend and no proxy mode, so nothing of those can run."""

    def __init__(self, tokens: TokenFile, config: Config, options: GatewayOptions) -> None:
        self.tokens = tokens
        self.config = config
        self.options = options
        self.slots = {a.id: DesktopSlot(a, phase=Phase.STOPPED, reason=EVENT_OVER, backend="none")
                      for a in tokens.accounts}

    @property
    def url(self) -> str:
        return gateway_url(self.config, self.options.listen)

    async def act(self, account_id: str, action: str) -> str:
        if account_id not in self.slots:
            raise LookupError(f"no desktop {account_id}")
        return f"nothing to do: {EVENT_OVER} (only downloads are served)"

    async def set_keyboard_layout(self, account_id: str, layout: str) -> None:
        raise BackendError(EVENT_OVER)

    async def extend(self, seconds: float, accounts: list[str] | None, actor: str) -> list[str]:
        return [f"nothing to extend: {EVENT_OVER} (downloads are offered {until_text(self.config)})"]

    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[str], None] | None = None) -> None:
        state_dir = self.options.state_dir
        ensure_private_dir(state_dir)
        (state_dir / "logs").mkdir(exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            store = open_state_store(state_dir)
            stack.callback(store.close)
            _refuse_running_desktops(store)
            await stop_leftover_services(store)
            host, port = parse_listen(self.options.listen)
            if not port_is_free(host, port):
                raise UserError(f"--listen {self.options.listen}: the port is already in use")
            front = WebFront(self.config, state_dir, self.options.listen, store)
            cockpit = front.make_cockpit(self.slots, act=self.act, metrics=GatewayMetrics(), thumbnails=None,
                                         extend=self.extend)
            app = make_app(self.config, self.slots, novnc=novnc_dir(self.config), store=store,
                           state_dir=state_dir, cockpit=cockpit, set_keyboard_layout=self.set_keyboard_layout)
            app[TEMPLATES].globals["after_event"] = landing_notice(self.config)
            apache = await front.serve(stack, app, cockpit, routes=[])
            store.record_event("after-event:up", None, f"downloads served at {self.url}")
            if on_ready is not None:
                on_ready(self._announcement(store))
            async with asyncio.TaskGroup() as group:
                keeper = group.create_task(front.keep_apache(apache)) if apache is not None else None
                await stop.wait()
                if keeper is not None:
                    keeper.cancel()
            store.record_event("after-event:down", None, "")

    def _announcement(self, store: StateStore) -> str:
        packed = {r.account for r in archive_records(store)}
        count = sum(1 for account in self.slots if account in packed)
        return (f"After the event: {count} of {len(self.slots)} archives offered for download "
                f"{until_text(self.config)}; no desktops run.\nLanding page: {self.url}")


def _refuse_running_desktops(store: StateStore) -> None:
    left = sorted(store.desktops())
    if left:
        raise UserError(f"desktops of the event are still recorded ({', '.join(left[:5])}"
                        f"{', ...' if len(left) > 5 else ''}): stop them with `gateway down` first")


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
    if not (state_dir / STATE_DB).exists():
        return "Nothing remains offered: this state dir has no archives."
    store = open_state_store(state_dir)
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
