"""The gateway's proxy chain for synthetic backends, in a process of its own.

``python -m bench.chain SPEC.json`` builds, with the gateway's own code, what `gateway up` builds
in front of the desktops: the proxy mode (per-account, shared or builtin), the aiohttp web app
(landing page, viewer, builtin relay) and the private Apache with the generated, MPM-sized
configuration. Each account's desktop endpoint is a synthetic backend instead of Xvnc. It prints
one JSON line with the URLs (through Apache, and straight to the proxy) and runs until its stdin
closes, then stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

from aiohttp import web

from gateway.proxies.apache import ApacheLayout, PrivateApache, novnc_dir, render_apache_config
from gateway.backends.base import Endpoint
from gateway.model.config import parse_config
from gateway.proxies.modes import make_proxy_mode
from gateway.proxies.websockify import SharedWebsockify
from gateway.model.status import DesktopSlot, Phase
from gateway.model.tokens import Account
from gateway.web.app import make_app

from .synthetic import pin


async def build(spec: dict) -> None:
    # The gateway under test gets its own core(s); Apache and the proxies it starts inherit them.
    pin(spec.get("cpus"))
    mode, work = spec["mode"], Path(spec["work"])
    config = parse_config(f"proxy:\n  mode: {mode}\n" + spec.get("proxy_extra", ""))
    accounts = [Account(a["id"], "localhost", a["path"], a["ws_port"], a["backend_port"], "secret1", i + 1)
                for i, a in enumerate(spec["accounts"])]
    slots = {a.id: DesktopSlot(a, backend="local") for a in accounts}
    for slot in slots.values():
        slot.set(Phase.READY)
    proxy = make_proxy_mode(config, logs_dir=work / "logs", runtime_dir=work / "proxy", slots=slots)
    async with contextlib.AsyncExitStack() as stack:
        app = make_app(config, slots, novnc=novnc_dir(config))
        app.router.add_routes(proxy.web_routes(accounts))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        web_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        listen = f"127.0.0.1:{spec['apache_port']}"
        apache = PrivateApache(config, ApacheLayout(work / "apache"))
        # apache_extra: directives appended for an A/B measurement of an Apache setting (bench only).
        await apache.write_config(render_apache_config(config, proxy.routes(accounts), web_port=web_port,
                                                       layout=apache.layout, listen=listen)
                                  + spec.get("apache_extra", ""))
        await apache.start(listen)
        stack.push_async_callback(apache.stop)

        running = []
        limit = asyncio.Semaphore(8)  # as desktop.start_concurrency

        async def start(account: Account) -> None:
            async with limit:
                running.append(await proxy.start(account, Endpoint("127.0.0.1", account.vnc_port)))

        try:
            await asyncio.gather(*(start(a) for a in accounts))
            urls = {}
            for a in accounts:
                if mode == "per-account":
                    direct = f"ws://127.0.0.1:{a.websocket_port}/"
                elif mode == "shared":
                    assert isinstance(proxy, SharedWebsockify)
                    direct = f"ws://127.0.0.1:{proxy.port}/?token={proxy.token(a.id)}"
                else:
                    direct = f"ws://127.0.0.1:{web_port}{a.websocket_path}"
                urls[a.id] = {"apache": f"ws://{listen}{a.websocket_path}", "direct": direct}
            print(json.dumps({"urls": urls, "web_port": web_port, "apache_url": f"http://{listen}/",
                              "web_url": f"http://127.0.0.1:{web_port}/",
                              "apache_pid": apache.process.pid if apache.process else None}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        finally:
            await asyncio.gather(*(proxy.stop(p) for p in running), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(build(json.loads(Path(sys.argv[1]).read_text())))
