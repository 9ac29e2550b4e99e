"""A day that runs late: warnings inside the desktop before its end, and `gateway extend`.

On the real Slurm test cluster: a desktop job whose time limit comes close gets a message window on
its display (found with xdotool, as a participant would see it), and `gateway extend` raises the
job's TimeLimit (as `scontrol show job` shows it) and the end of the event reservation the gateway
made, and is written to the audit log. An extension beyond the partition's MaxTime (which Slurm lets its
admin pass) is refused by the gateway in one line per job, and the job keeps its limit.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.model.config import IdleConfig
from gateway.supervisor.idle import IdleWatcher
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Phase
from gateway.model.tokens import Account
from tests.gateway_run import GatewayRun
from tests.system import message_windows, require_program, wait_for
from tests.test_slurm_gateway import (  # noqa: F401 - fixtures
    READY_WITHIN_S,
    auto_accounts,
    cluster,
    recorded_jobs,
    reservations,
    slurm_event,
)


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30).stdout


def audit(run: GatewayRun) -> list[tuple[str | None, str, str]]:
    store = StateStore(run.state_dir / "gateway.db")
    try:
        return [(account, kind, detail) for _, account, kind, detail in store.events()]
    finally:
        store.close()


@pytest.mark.system
async def test_a_slurm_desktop_is_warned_before_its_time_limit_and_extend_raises_it(slurm_event) -> None:
    require_program("xdotool")
    require_program("srun")
    accounts = auto_accounts(["ex01"])
    # time_limit_s is 1800: a warning 29.9 minutes before the end comes seconds after the job starts.
    run: GatewayRun = slurm_event(accounts, "idle:\n  end_warnings_minutes: [29.9, 5]\n  check_interval_s: 1\n")
    run.up(timeout_s=READY_WITHIN_S)
    job_id = recorded_jobs(run)["ex01"]
    assert "TimeLimit=00:30:00" in scontrol("show", "job", "-o", str(job_id))
    (reservation,) = reservations(run.prefix)  # type: ignore[attr-defined]
    end_before = re.search(r"EndTime=(\S+)", scontrol("show", "reservation", "-o", reservation)).group(1)

    report = (run.state_dir / "slurm" / "ex01" / f"report-{job_id}").read_text()
    display = ":" + re.search(r"display=(\d+)", report).group(1)
    xauthority = f"/tmp/workshop-desktop-0-{job_id}/Xauthority"  # the job runs as root here (run_as: gateway)
    assert await asyncio.to_thread(wait_for, lambda: message_windows({"DISPLAY": display, "XAUTHORITY": xauthority}), 20), run.text()
    warned = [d for a, k, d in audit(run) if k == "end:warn" and a == "ex01"]
    assert warned and "time limit" in warned[0]

    result = subprocess.run([sys.executable, "-m", "gateway", "extend", "10m", "--state-dir", str(run.state_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ex01: job {job_id}: time limit +10 min" in result.stdout
    assert "TimeLimit=00:40:00" in scontrol("show", "job", "-o", str(job_id))
    end_after = re.search(r"EndTime=(\S+)", scontrol("show", "reservation", "-o", reservation)).group(1)
    from datetime import datetime
    assert (datetime.fromisoformat(end_after) - datetime.fromisoformat(end_before)).total_seconds() == 600
    assert any(k == "extend" and a == "ex01" and "+10 min" in d for a, k, d in audit(run))
    # The participant still has the desktop, and the status shows its new end.
    assert run.status()["ex01"]["state"] == "ready"

    # The admin page offers the same; a bad request changes nothing.
    password = (run.state_dir / "secrets" / "admin.password").read_text().strip()
    headers = {"Authorization": aiohttp.encode_basic_auth("admin", password)}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{run.url}admin/api/extend", json={"minutes": 5}, headers=headers) as response:
            assert response.status == 200, await response.text()
            assert any(f"job {job_id}: time limit +5 min" in line for line in (await response.json())["lines"])
        async with session.post(f"{run.url}admin/api/extend", json={"minutes": -5}, headers=headers) as response:
            assert response.status == 400
    assert "TimeLimit=00:45:00" in scontrol("show", "job", "-o", str(job_id))
    bad = subprocess.run([sys.executable, "-m", "gateway", "extend", "soon", "--state-dir", str(run.state_dir)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.system
async def test_jobs_submitted_after_a_crash_get_the_extended_limit(slurm_event) -> None:
    """The limit of new jobs lives in the gateway (Slurm keeps the running job's and the reservation's): a
    gateway that crashed takes it back from its state, and the job that replaces a cancelled one gets it."""
    run: GatewayRun = slurm_event(auto_accounts(["cr01"]))
    run.up(timeout_s=READY_WITHIN_S)
    first = recorded_jobs(run)["cr01"]
    extended = subprocess.run([sys.executable, "-m", "gateway", "extend", "10m", "--state-dir", str(run.state_dir)],
                              capture_output=True, text=True, timeout=120)
    assert extended.returncode == 0, extended.stdout + extended.stderr
    assert run.process is not None
    os.kill(run.process.pid, signal.SIGKILL)
    run.process.wait()

    run.up(timeout_s=READY_WITHIN_S)
    assert recorded_jobs(run)["cr01"] == first  # adopted, with the limit Slurm kept
    assert "TimeLimit=00:40:00" in scontrol("show", "job", "-o", str(first))
    assert any(k == "extend" and d == "after a restart: new desktop jobs: time limit 0-00:40:00"
               for _, k, d in audit(run)), audit(run)
    subprocess.run(["scancel", str(first)], check=True, timeout=30)
    assert await asyncio.to_thread(wait_for, lambda: recorded_jobs(run).get("cr01") not in (first, None),
                                   READY_WITHIN_S), run.text()
    assert "TimeLimit=00:40:00" in scontrol("show", "job", "-o", str(recorded_jobs(run)["cr01"]))


@pytest.fixture
def short_partition() -> Iterator[str]:
    """A partition of the test cluster's node that allows 40 minutes per job, deleted afterwards. A test
    asks for it before slurm_event, so it goes after that event's jobs and reservation."""
    name = f"gwx{os.getpid() % 10000}p{random.randint(100, 999)}"
    nodes = subprocess.run(["sinfo", "--noheader", "--partition=desktop", "--format=%N"], capture_output=True,
                           text=True, timeout=30).stdout.strip()
    created = subprocess.run(["scontrol", "create", f"PartitionName={name}", f"Nodes={nodes}", "MaxTime=00:40:00",
                              "State=UP"], capture_output=True, text=True, timeout=30)
    assert created.returncode == 0, created.stderr
    try:
        yield name
    finally:
        subprocess.run(["scontrol", "delete", f"PartitionName={name}"], capture_output=True, timeout=30)


@pytest.mark.system
async def test_an_extension_beyond_the_partitions_max_time_is_refused_in_one_line(short_partition, slurm_event) -> None:
    """Slurm lets its admin (the gateway) raise a TimeLimit past MaxTime, and a job submitted past it never
    starts: the gateway refuses both itself, says so, and carries on; what fits is then extended."""
    run: GatewayRun = slurm_event(auto_accounts(["mx01"]), f"  partition: {short_partition}\n")
    run.up(timeout_s=READY_WITHIN_S)
    job_id = recorded_jobs(run)["mx01"]
    assert "TimeLimit=00:30:00" in scontrol("show", "job", "-o", str(job_id))

    refused = subprocess.run([sys.executable, "-m", "gateway", "extend", "20m", "--state-dir", str(run.state_dir)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = refused.stdout.splitlines()
    assert f"mx01: not extended: job {job_id}: partition {short_partition} allows at most 0-00:40:00 per job " \
           "(MaxTime); 0-00:30:00 +20 min would be 0-00:50:00, at most +10 min fits" in lines, lines
    assert [line for line in lines if line.startswith("new desktop jobs:")] == [
        f"new desktop jobs: not extended: partition {short_partition} allows at most 0-00:40:00 per job (MaxTime); "
        "0-00:30:00 +20 min would be 0-00:50:00, at most +10 min fits"]
    assert "2 not extended (see above)" in refused.stderr
    assert "TimeLimit=00:30:00" in scontrol("show", "job", "-o", str(job_id))  # Slurm was not asked
    assert any(k == "extend" and a == "mx01" and "not extended" in d for a, k, d in audit(run))
    assert run.process is not None and run.process.poll() is None
    assert run.status()["mx01"]["state"] == "ready"

    fits = subprocess.run([sys.executable, "-m", "gateway", "extend", "10m", "--state-dir", str(run.state_dir)],
                          capture_output=True, text=True, timeout=120)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert f"mx01: job {job_id}: time limit +10 min" in fits.stdout
    assert "new desktop jobs: time limit 0-00:40:00" in fits.stdout
    assert "TimeLimit=00:40:00" in scontrol("show", "job", "-o", str(job_id))


@pytest.mark.system  # the module uses test_slurm_gateway's autouse cluster fixture
async def test_end_warnings_follow_the_event_window_and_its_extension(tmp_path: Path) -> None:
    """Local and SSH desktops have no job: their end is the idle policy's event window, extended alike."""
    now = time.time()
    end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now + 4 * 60))
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 3600))
    store = StateStore(tmp_path / "gateway.db")
    slot = DesktopSlot(Account("lo01", "localhost", "/d/lo01", 6001, 5901, "secret12", 1))
    slot.set(Phase.READY)
    shown: list[str] = []

    async def notify(account: str, text: str) -> None:
        shown.append(text)

    async def act(account: str, action: str) -> str:
        return "done"

    watcher = IdleWatcher(IdleConfig(event_start=start, event_end=end), {"lo01": slot}, store, act=act,
                          notify=notify, count_viewers=lambda s, c: 0, input_known=False)
    await watcher.check(now)
    await watcher.check(now + 1)
    assert len(shown) == 1 and "ends in about 4 min" in shown[0] and "end of the event" in shown[0]
    watcher.extend_window(10 * 60, None)
    await watcher.check(now + 2)
    assert len(shown) == 2 and "ends in about 14 min" in shown[1]
    store.close()
