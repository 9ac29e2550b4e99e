"""per-account mode's websockify processes, forked from one pre-loaded parent, behave like separate websockify
processes: one per account with its own pid, session, command line and log; killing one (SIGKILL) drops only
that account's viewers and it can be started again; each connection gets a child of that account's process,
as websockify makes them; and a dead fork server takes no account's proxy with it.

Real websockify 0.13 (its library, in the forked children); the VNC servers are small echo servers.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.backends.base import Endpoint
from gateway.model.config import parse_config
from gateway.common.polling import poll_until
from gateway.common.proc import process_start_time, stat_fields
from gateway.proxies.base import RunningProxy
from gateway.proxies.modes import make_proxy_mode
from gateway.proxies.websockify import PerAccountWebsockify
from gateway.model.tokens import Account
from tests.system import free_ports


def children(pid: int) -> list[int]:
    """Live (not yet reaped, not zombie) children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(entry.name) if entry.name.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


async def child_counts_become(expected: dict[int, int], timeout_s: float = 5) -> None:
    """Return once each pid has exactly its expected number of live children; fail after ``timeout_s``.

    The gateway's readiness probe is itself a connection, so each websockify briefly has a child for it
    (gone once the probe's close is seen): wait for that instead of counting it as a viewer's.
    """
    await poll_until(lambda: {pid: len(children(pid)) for pid in expected} == expected, timeout_s=timeout_s,
                     what=f"live children per websockify pid: {expected}")


async def echo_vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"RFB 003.008\n")
    try:
        while data := await reader.read(65536):
            writer.write(data)
    finally:
        writer.close()


@dataclass
class Proxies:
    mode: PerAccountWebsockify
    accounts: list[Account]
    running: dict[str, RunningProxy]
    logs: Path

    def url(self, account: Account) -> str:
        return f"ws://127.0.0.1:{account.websocket_port}/"

    async def start(self, account: Account) -> RunningProxy:
        self.running[account.id] = await self.mode.start(account, Endpoint("127.0.0.1", account.vnc_port))
        return self.running[account.id]


@pytest.fixture
async def proxies(tmp_path: Path) -> AsyncIterator[Proxies]:
    servers = [await asyncio.start_server(echo_vnc, "127.0.0.1", 0) for _ in range(2)]
    listen = free_ports(2)
    accounts = [Account(f"ws0{i}", "localhost", f"/desktop/ws0{i}", listen[i], s.sockets[0].getsockname()[1],
                        "secret1", i + 1) for i, s in enumerate(servers)]
    mode = make_proxy_mode(parse_config(""), logs_dir=tmp_path / "logs", runtime_dir=tmp_path / "proxy", slots={})
    assert isinstance(mode, PerAccountWebsockify)
    setup = Proxies(mode, accounts, {}, tmp_path / "logs")
    try:
        await asyncio.gather(*(setup.start(a) for a in accounts))
        yield setup
    finally:
        async with asyncio.timeout(20):  # a proxy whose exit went unseen would hang the stop: fail instead
            for proxy in setup.running.values():
                await mode.stop(proxy)
            await mode.server.close()
        for server in servers:
            server.close()


async def open_viewer(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(url, protocols=("binary",))
    assert await ws.receive_bytes() == b"RFB 003.008\n"
    return ws


async def echoes(ws: aiohttp.ClientWebSocketResponse) -> bool:
    try:
        await ws.send_bytes(b"ping")
        async with asyncio.timeout(5):
            return await ws.receive_bytes() == b"ping"
    except (ConnectionError, TypeError, TimeoutError, aiohttp.ClientError):
        return False  # receive_bytes raises TypeError on a CLOSE message


async def test_each_account_has_a_websockify_process_of_its_own(proxies: Proxies) -> None:
    pids = {a.id: proxies.running[a.id].process.pid for a in proxies.accounts}  # type: ignore[union-attr]
    assert len(set(pids.values())) == 2
    for account in proxies.accounts:
        pid = pids[account.id]
        fields = stat_fields(pid)
        assert fields is not None
        assert int(fields[2]) == pid and int(fields[3]) == pid  # leads its own process group and session
        assert int(fields[1]) == proxies.mode.server.process.pid  # type: ignore[union-attr] # forked, not exec'ed
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert cmdline[1:] == [b"-m", b"websockify", b"--heartbeat", b"5", f"127.0.0.1:{account.websocket_port}".encode(),
                               f"127.0.0.1:{account.vnc_port}".encode()]
        identity = proxies.running[account.id].identity
        assert identity is not None and identity.pgid == pid and identity.start_time == process_start_time(pid)
        log = (proxies.logs / f"{account.id}.websockify.log").read_text()
        assert f"proxying from 127.0.0.1:{account.websocket_port} to 127.0.0.1:{account.vnc_port}" in log


async def test_connections_get_children_and_a_killed_proxy_drops_only_its_account(proxies: Proxies) -> None:
    victim, bystander = proxies.accounts
    victim_pid = proxies.running[victim.id].process.pid  # type: ignore[union-attr]
    bystander_pid = proxies.running[bystander.id].process.pid  # type: ignore[union-attr]
    await child_counts_become({victim_pid: 0, bystander_pid: 0})  # the readiness probes' children have ended
    async with aiohttp.ClientSession() as http:
        viewers = {a.id: await open_viewer(http, proxies.url(a)) for a in proxies.accounts}
        # One child per connection, of that account's websockify (websockify's own process model).
        await child_counts_become({victim_pid: 1, bystander_pid: 1})
        assert all([await echoes(ws) for ws in viewers.values()])

        os.kill(victim_pid, signal.SIGKILL)
        assert await asyncio.wait_for(proxies.running[victim.id].wait(), 5) == -signal.SIGKILL
        # Its connection child was in its process group: stopping that group ends the viewer too.
        await proxies.mode.stop(proxies.running[victim.id])
        assert not await echoes(viewers[victim.id])
        assert await echoes(viewers[bystander.id])  # the other account never noticed
        assert proxies.running[bystander.id].alive

        restarted = await proxies.start(victim)  # what the supervisor does when a proxy exits
        assert restarted.process.pid != victim_pid  # type: ignore[union-attr]
        again = await open_viewer(http, proxies.url(victim))
        assert await echoes(again)
        assert await echoes(viewers[bystander.id])
        for ws in (again, *viewers.values()):
            await ws.close()


async def test_accounts_outlive_a_killed_fork_server(proxies: Proxies) -> None:
    server = proxies.mode.server.process
    assert server is not None
    server.kill()
    await server.wait()
    account = proxies.accounts[0]
    async with aiohttp.ClientSession() as http:
        ws = await open_viewer(http, proxies.url(account))  # forked websockify serve on
        assert await echoes(ws)
        await ws.close()
        # The gateway still learns when one of them dies, without the fork server to tell it.
        proxy = proxies.running[account.id]
        os.kill(proxy.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        assert await asyncio.wait_for(proxy.wait(), 5) != 0
        await proxies.mode.stop(proxy)
        restarted = await proxies.start(account)  # a new fork server is started for it
        assert proxies.mode.server.process is not server
        ws = await open_viewer(http, proxies.url(account))
        assert await echoes(ws)
        await ws.close()
        assert restarted.alive
