"""A queued Slurm desktop says why it waits and when it should start; a failed job says why it failed.

On the real Slurm test cluster. The queued job is held back by a job constraint of this test's own
(``--begin``: Slurm's reason BeginTime, and its expected start), so the shared node is never blocked
for other tests. The failed job is a real Xvnc that cannot listen: its output's last lines reach
`gateway status` (never the password) within 30 s.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.gateway_run import GatewayRun
from tests.test_slurm_gateway import auto_accounts, cluster, slurm_event  # noqa: F401 - fixtures

pytestmark = pytest.mark.system

EXPECTED_RE = re.compile(r"queued \(BeginTime\); expected to start at (\d\d:\d\d) \(in (\d+) min\)")


def status_json(run: GatewayRun) -> tuple[str, dict]:
    result = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "--state-dir", str(run.state_dir)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout, {row["account"]: row for row in json.loads(result.stdout)["desktops"]}


async def test_a_queued_desktop_shows_slurms_reason_and_expected_start_everywhere(slurm_event) -> None:
    accounts = auto_accounts(["qe01", "qe02"])
    run: GatewayRun = slurm_event(accounts, '  extra_sbatch_args: ["--begin=now+180"]\n')
    run.start()
    expected_start = time.strftime("%H:%M", time.localtime(time.time() + 180))
    later = time.strftime("%H:%M", time.localtime(time.time() + 240))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        landing = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                async with session.get(run.url) as response:
                    landing = await response.text()
            except aiohttp.ClientError:
                landing = ""
            if landing.count("expected to start at") == 2:
                break
            await asyncio.sleep(0.5)
        assert landing.count("expected to start at") == 2, landing[-2000:] + run.text()
        start, minutes = EXPECTED_RE.search(landing).groups()
        assert start in (expected_start, later) and 2 <= int(minutes) <= 3

        # The participant's own page, after signing in.
        account = accounts[0]
        async with session.get(f"{run.url}login") as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)
        async with session.post(f"{run.url}login", data={"csrf": csrf, "account": account.id,
                                                         "password": account.password}) as response:
            me = await response.text()
        assert EXPECTED_RE.search(me), me

        # The organisers' views.
        _, rows = status_json(run)
        assert all(EXPECTED_RE.search(rows[a.id]["reason"]) for a in accounts)
        password = (run.state_dir / "secrets" / "admin.password").read_text().strip()
        headers = {"Authorization": aiohttp.encode_basic_auth("admin", password)}
        async with session.get(f"{run.url}admin/api/desktops", headers=headers) as response:
            admin_rows = (await response.json())["desktops"]
        assert all(EXPECTED_RE.search(r["reason"]) for r in admin_rows)
    # One shared squeue snapshot serves every account: the gateway ran no squeue per account.
    assert "squeue" not in run.text()


async def test_a_job_that_fails_before_its_desktop_answers_shows_its_last_output(slurm_event) -> None:
    accounts = auto_accounts(["fo01"])
    account = accounts[0]
    run: GatewayRun = slurm_event(accounts)
    # Something else holds the desktop's VNC port on the node (this machine): Xvnc cannot listen.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", account.vnc_port))
        squatter.listen()
        started = time.monotonic()
        run.start()
        row: dict = {}
        text = ""
        while time.monotonic() - started < 30:
            text, rows = status_json(run) if (run.state_dir / "control.sock").exists() else ("", {})
            row = rows.get(account.id, {})
            if row.get("output_tail"):
                break
            await asyncio.sleep(0.5)
        print(f"\nfailed job's output in status after {time.monotonic() - started:.1f} s: {row.get('reason')}")
        assert "last output:" in (row.get("reason") or ""), text
        assert "Xvnc exited before it listened" in row["output_tail"]
        assert account.password not in text
        table = subprocess.run([sys.executable, "-m", "gateway", "status", "--state-dir", str(run.state_dir)],
                               capture_output=True, text=True, timeout=30).stdout
        assert "Xvnc exited before it listened" in table and account.password not in table
        # Participants see that it restarts, not the job's output.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{run.url}api/desktops") as response:
                public = json.dumps(await response.json())
        assert "last output" not in public and "Xvnc exited" not in public
