"""The gateway's web side: the pages' server, the control socket, and the Apache in front of them.

Used by :class:`~gateway.supervisor.gateway.Gateway` and, without desktops, by
:class:`~gateway.supervisor.after_event.AfterEventGateway`. Everything started here is stopped by
the exit stack it is given, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.backends.desktop_users import limits_in_force
from gateway.common.proc import terminate_group
from gateway.model.config import Config, parse_listen
from gateway.model.errors import UserError
from gateway.model.restart import RestartPolicy
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.proxies.apache import ApacheLayout, PrivateApache, install_system_rules, render_apache_config
from gateway.proxies.base import Route
from gateway.web.cockpit import (ActFunction, Cockpit, ExtendFunction, GatewayMetrics, admin_password_path,
                                 load_or_create_admin_password, make_control_app)
from gateway.web.thumbnails import ThumbnailService

__all__ = ["WebFront", "CONTROL_SOCKET", "port_is_free", "gateway_url"]

log = logging.getLogger("gateway")

#: The control socket in the state dir (see gateway.web.cockpit).
CONTROL_SOCKET = "control.sock"


def gateway_url(config: Config, listen: str) -> str:
    """The landing page's address, as participants reach it."""
    if config.public_url:
        return config.public_url
    scheme = "https" if config.tls.enabled else "http"
    host, port = parse_listen(listen)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}/"


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True, slots=True)
class WebFront:
    """Starts the web side of one gateway run; ``store`` is that run's open state database."""

    config: Config
    state_dir: Path
    listen: str
    store: StateStore

    @property
    def url(self) -> str:
        return gateway_url(self.config, self.listen)

    def make_cockpit(self, slots: Mapping[str, DesktopSlot], *, act: ActFunction, metrics: GatewayMetrics,
                     thumbnails: ThumbnailService | None, extend: ExtendFunction) -> Cockpit:
        password_file = admin_password_path(self.config, self.state_dir)
        return Cockpit(slots=slots, store=self.store, act=act, metrics=metrics,
                       admin_user=self.config.admin.user,
                       admin_password=load_or_create_admin_password(password_file),
                       thumbnails=thumbnails, state_dir=self.state_dir,
                       isolation=limits_in_force(self.config), extend=extend)

    async def serve(self, stack: contextlib.AsyncExitStack, app: web.Application, cockpit: Cockpit,
                    routes: list[Route]) -> PrivateApache | None:
        """The control socket, the pages, and the front before them; the private Apache if one runs."""
        await self.start_control(stack, cockpit)
        web_port = await self.start_web(stack, app)
        return await self.start_apache(stack, routes, web_port)

    async def start_control(self, stack: contextlib.AsyncExitStack, cockpit: Cockpit) -> None:
        """`gateway status` and friends talk to this Unix socket; only our own user may open it."""
        path = self.state_dir / CONTROL_SOCKET
        path.unlink(missing_ok=True)
        runner = web.AppRunner(make_control_app(cockpit), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        old_umask = os.umask(0o177)  # the socket is created 0600, never briefly open to others
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old_umask)

    async def start_web(self, stack: contextlib.AsyncExitStack, app: web.Application) -> int:
        """Serve ``app``; returns the port it listens on."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if self.config.apache.mode == "private":
            site = web.TCPSite(runner, "127.0.0.1", 0)  # Apache is the front; any free port will do
        else:
            host, port = parse_listen(self.listen)
            tls = self._tls_context() if self.config.apache.mode == "none" else None
            site = web.TCPSite(runner, host, port, ssl_context=tls)
        await site.start()
        server = site._server  # aiohttp reports the bound port only through the server's sockets
        if server is None or not server.sockets:
            raise RuntimeError("the web server did not bind a socket")
        web_port = int(server.sockets[0].getsockname()[1])
        log.info("web app listening port=%d", web_port)
        return web_port

    def _tls_context(self) -> ssl.SSLContext | None:
        """Without Apache the gateway serves https itself when a certificate is configured."""
        tls = self.config.tls
        if not tls.enabled or tls.cert is None or tls.key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"tls.cert/tls.key: cannot load {tls.cert}: {exc}") from None
        return context

    async def start_apache(self, stack: contextlib.AsyncExitStack, routes: list[Route],
                           web_port: int) -> PrivateApache | None:
        """The front as ``apache.mode`` says; returns the private Apache if this gateway runs one."""
        if self.config.apache.mode == "none":
            return None  # the web app itself listens on --listen
        if self.config.apache.mode == "system":
            text = render_apache_config(self.config, routes, web_port=web_port, layout=None, listen=self.listen)
            await install_system_rules(self.config, text)
            return None
        layout = ApacheLayout(self.state_dir / "apache")
        apache = PrivateApache(self.config, layout)
        text = render_apache_config(self.config, routes, web_port=web_port, layout=layout, listen=self.listen)
        await apache.write_config(text)
        await self._launch_apache(apache)
        stack.push_async_callback(self._stop_apache, apache)
        return apache

    async def _launch_apache(self, apache: PrivateApache) -> None:
        _, identity = await apache.start(self.listen)
        self.store.save_service("apache", identity)

    async def _stop_apache(self, apache: PrivateApache) -> None:
        await apache.stop()
        self.store.forget_service("apache")

    async def keep_apache(self, apache: PrivateApache) -> None:
        """Restart the private Apache if it dies; participants' tunnels reconnect by themselves."""
        policy = RestartPolicy(self.config.restart)
        while True:
            process, identity = apache.process, apache.identity
            if process is None or identity is None:
                return  # not running: nothing to keep
            status = await process.wait()
            log.error("apache exited status=%s", status)
            # Its workers may outlive it for a moment, still holding the listening socket.
            await terminate_group(identity, proc=process, grace_s=2)
            delay = policy.next_delay()
            if delay is None:
                log.error("apache keeps failing; giving up (see %s)", apache.layout.error_log)
                return
            await asyncio.sleep(delay)
            await self._launch_apache(apache)
