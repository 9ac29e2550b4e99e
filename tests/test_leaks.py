"""Load and leaks: many simultaneous websocket connect/disconnect cycles through Apache to the desktops.

Bounded in count and time. Afterwards the gateway, websockify and Apache hold no more processes,
file descriptors, memory (PSS) or TCP connections to the VNC ports than before, in every proxy mode.
The slack allowed for lazily opened descriptors and allocator caches is a fixed part plus a part per
cycle, so that a leak of a fraction of a descriptor or a few kB per connection still fails whatever
CYCLES is. Real Xvnc, websockify and Apache; nothing mocked.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.common import rfb
from gateway.common.netstat import established_by_remote
from gateway.model.state import StateStore
from tests.gateway_run import GatewayRun
from tests.os_check import processes
from tests.ssh_host import children_of

pytestmark = pytest.mark.system

CYCLES = 200
ACCOUNTS = 4
PER_ACCOUNT_AT_ONCE = 2  # below the viewers-per-account limit that Apache enforces (proxy.max_viewers_per_account)
AT_ONCE = ACCOUNTS * PER_ACCOUNT_AT_ONCE
WRONG_EVERY = 5  # every fifth attempt uses a wrong password
LOOP_LIMIT_S = 120.0
# Slack: a fixed part plus a rate per cycle (a leak of one descriptor every 50 cycles, or 16 kB of
# PSS per cycle, is already too much).
FD_SLACK_FIXED = 2
FD_SLACK_PER_CYCLE = 1 / 100
PSS_SLACK_FIXED_KB = 1536
PSS_SLACK_PER_CYCLE_KB = 8


def fd_slack(cycles: int) -> int:
    return FD_SLACK_FIXED + int(cycles * FD_SLACK_PER_CYCLE)


def pss_slack_kb(cycles: int) -> int:
    return PSS_SLACK_FIXED_KB + cycles * PSS_SLACK_PER_CYCLE_KB


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pss_kb(pids: list[int]) -> int:
    """Proportional set size of these processes together, in kB (shared pages counted once)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # an Apache child that just ended
        total += next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    return total


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (field 5 of /proc/PID/stat)."""
    return [p.pid for p in processes() if p.pgid == pgid]


def settle(measure: Callable[[], int], limit: int, timeout_s: float = 15) -> int:
    """Wait until ``measure()`` is at most ``limit`` (connections close asynchronously); return the last value."""
    deadline = time.monotonic() + timeout_s
    value = measure()
    while value > limit and time.monotonic() < deadline:
        time.sleep(0.2)
        value = measure()
    return value


async def cycles(run: GatewayRun, count: int, at_once: int) -> dict[str, int]:
    limit = asyncio.Semaphore(at_once)
    per_account = {a.id: asyncio.Semaphore(PER_ACCOUNT_AT_ONCE) for a in run.accounts}
    outcome = {"ok": 0, "refused": 0}

    async def one(i: int) -> None:
        account = run.accounts[i % len(run.accounts)]
        wrong = i % WRONG_EVERY == 0
        async with per_account[account.id], limit:
            if wrong:
                with pytest.raises(rfb.RfbAuthFailed):
                    await rfb.connect_websocket(run.ws_url(account), "wrong-" + account.password[:6], timeout_s=20)
                outcome["refused"] += 1
            else:
                session = await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=20)
                assert session.name == account.id
                outcome["ok"] += 1

    async with asyncio.TaskGroup() as group:
        for i in range(count):
            group.create_task(one(i))
    return outcome


@pytest.mark.parametrize("mode", ["per-account", "shared", "builtin"])
async def test_connect_disconnect_cycles_leak_no_processes_descriptors_or_connections(gateway_factory, mode: str) -> None:
    run: GatewayRun = gateway_factory(count=ACCOUNTS, config_text=f"proxy:\n  mode: {mode}\n")
    run.up()
    assert run.process is not None
    store = StateStore(run.state_dir / "gateway.db")
    try:
        services = store.services()
    finally:
        store.close()
    gateway_pid = run.process.pid
    apache = services["apache"]
    proxies = sorted({services[f"proxy:{a.id}"].pid for a in run.accounts}) if mode != "builtin" else []
    assert len(proxies) == {"per-account": ACCOUNTS, "shared": 1, "builtin": 0}[mode]
    vnc_ends = [("127.0.0.1", a.vnc_port) for a in run.accounts]

    def vnc_connections() -> int:
        counts = established_by_remote()
        return sum(counts[end] for end in vnc_ends)

    def proxy_children() -> int:
        return sum(len(children_of(pid)) for pid in proxies)

    # A warm-up round: Apache starts its spare children, aiohttp and websockify open what they keep.
    # Long enough that every worker thread of Apache has served a tunnel (its stack touched once).
    await cycles(run, CYCLES // 2, AT_ONCE)
    assert settle(vnc_connections, 0) == 0
    settle(proxy_children, 0)
    gateway_fds = fd_count(gateway_pid)
    proxy_fds = {pid: fd_count(pid) for pid in proxies}
    proxy_kids = proxy_children()
    memory = {"gateway": lambda: pss_kb([gateway_pid]), "websockify": lambda: pss_kb(proxies),
              "apache": lambda: pss_kb(group_members(apache.pgid))}
    memory_before = {name: measure() for name, measure in memory.items()}

    started = time.monotonic()
    outcome = await cycles(run, CYCLES, AT_ONCE)
    elapsed = time.monotonic() - started
    assert elapsed < LOOP_LIMIT_S, elapsed
    assert outcome == {"ok": CYCLES - CYCLES // WRONG_EVERY, "refused": CYCLES // WRONG_EVERY}

    # No connection to a VNC port lingers.
    assert settle(vnc_connections, 0) == 0, established_by_remote()
    # websockify: the same processes, their per-connection children gone, their descriptors back.
    assert settle(proxy_children, proxy_kids) <= proxy_kids
    slack = fd_slack(CYCLES)
    for pid in proxies:
        assert settle(lambda pid=pid: fd_count(pid), proxy_fds[pid] + slack) <= proxy_fds[pid] + slack, pid
    # The gateway (which relays every byte in builtin mode) gives its descriptors back.
    assert settle(lambda: fd_count(gateway_pid), gateway_fds + slack) <= gateway_fds + slack
    # Memory: the gateway, its proxies (their per-connection children gone) and Apache's processes.
    limit = pss_slack_kb(CYCLES)
    memory_after = {name: settle(measure, memory_before[name] + limit) for name, measure in memory.items()}
    grown = {name: memory_after[name] - memory_before[name] for name in memory}
    assert all(kb <= limit for kb in grown.values()), (grown, limit, memory_before)
    # Each Apache child's descriptors: nothing piles up per connection.
    for pid in group_members(apache.pgid):
        try:
            assert fd_count(pid) < 64, (pid, fd_count(pid))
        except FileNotFoundError:
            continue  # an idle child that Apache just ended
    print(f"\n{mode}: {CYCLES} cycles ({AT_ONCE} at once) in {elapsed:.1f} s; gateway fds "
          f"{gateway_fds}->{fd_count(gateway_pid)}; websockify fds {proxy_fds}; PSS kB {memory_before} -> "
          f"{memory_after} (limit +{limit})")

    # And everything still works afterwards.
    for account in run.accounts:
        await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
    assert run.terminate() == 0
