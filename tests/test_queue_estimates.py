"""A queued Slurm desktop says why it waits and when it should start; a failed job says why it failed.

On the real Slurm test cluster. The queued desktops wait behind a filler job of this test's own that
holds every CPU of the node (in the partition the desktops use, with a known time limit) when the
gateway makes its event reservation (``Flags=IGNORE_JOBS``, as for a node still busy when the event
begins): Slurm's reason is Resources (or Priority), and its expected start is the filler's end, as
``squeue --start`` says. The gateway runs with ``-v`` so that every command it runs is logged: while the
desktops wait, their polls are served by one squeue snapshot at a time, never one squeue per account.
Once the filler is cancelled the desktops start. The failed job is a real Xvnc that cannot listen: its
output's last lines reach `gateway status` and the admin page (never a password) within 30 s.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import subprocess
import sys
import time
from datetime import datetime

import aiohttp
import pytest

from gateway.backends.slurm_client import QUEUE_TTL_S
from gateway.backends.slurm_parse import parse_job_id
from gateway.model.viewonly import view_only_password
from tests.gateway_run import GatewayRun, handshake_until_ok
from tests.test_cockpit import admin_password
from tests.test_slurm_gateway import auto_accounts, cluster, slurm_event  # noqa: F401 - fixtures

pytestmark = pytest.mark.system

#: The filler's time limit: the desktops' expected start is this far off when they queue.
FILLER_MINUTES = 5
#: Slurm estimates a queued job's start in its backfill pass, every 30 s (bf_interval's default).
ESTIMATE_WITHIN_S = 60

EXPECTED_RE = re.compile(r"queued \(([^()]+)\); expected to start at (\d\d:\d\d) \(in (\d+) min\)")
JOB_EXPECTED_RE = re.compile(r"job (\d+) " + EXPECTED_RE.pattern)
#: A command the gateway ran, as `gateway -v` logs it (gateway.common.proc.run).
COMMAND_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG gateway\.proc "
                        r"command argv=(.*) status=-?\d+ duration_s=", re.MULTILINE)


def status_json(run: GatewayRun) -> tuple[str, dict]:
    result = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "--state-dir", str(run.state_dir)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout, {row["account"]: row for row in json.loads(result.stdout)["desktops"]}


def shown(text: str) -> list[tuple[str, str]]:
    """(Slurm's reason, expected start) of each queued desktop ``text`` shows (the minutes left tick on)."""
    return [(reason, start) for reason, start, _ in EXPECTED_RE.findall(text)]


def start_verbose(run: GatewayRun) -> None:
    """`gateway -v up`: every command the gateway runs is logged, with its time."""
    argv = run.argv()
    argv.insert(argv.index("up"), "-v")
    with open(run.output, "ab") as out:
        run.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def slurm_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def fill_the_node(name: str) -> float:
    """Submit a job that holds every CPU of the node for FILLER_MINUTES (in the default partition, the
    desktops' own); once it runs, its end as time.time()."""
    submitted = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", "--exclusive",
                                f"--time={FILLER_MINUTES}", "--output=/dev/null", "--wrap", "sleep 3600"],
                               capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job_id = parse_job_id(submitted.stdout)
    deadline = time.monotonic() + 30
    while True:
        row = subprocess.run(["squeue", "--noheader", "-j", str(job_id), "--format=%T|%e"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        if row.startswith("RUNNING|"):
            return slurm_time(row.split("|")[1])
        assert time.monotonic() < deadline, f"the filler job {job_id} does not run: {row}"
        time.sleep(0.3)


def expected_starts() -> dict[int, tuple[str, float]]:
    """`squeue --start`: Slurm's reason and expected start of every queued job, by job id."""
    out = subprocess.run(["squeue", "--start", "--noheader", "--format=%i|%r|%S"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    rows = {}
    for line in out.splitlines():
        job_id, reason, start = line.strip().split("|")
        if start not in ("N/A", ""):
            rows[int(job_id)] = (reason, slurm_time(start))
    return rows


def commands_since_last_submit(log: str) -> list[tuple[float, str]]:
    """(time, command line) of the commands the gateway ran after its last sbatch."""
    commands = [(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), argv)
                for stamp, argv in COMMAND_RE.findall(log)]
    submits = [i for i, (_, argv) in enumerate(commands) if argv.startswith("sbatch ")]
    return commands[submits[-1] + 1:] if submits else []


async def test_desktops_queued_behind_a_full_node_show_slurms_reason_and_expected_start(slurm_event) -> None:
    accounts = auto_accounts(["qe01", "qe02"])
    run: GatewayRun = slurm_event(accounts)
    filler_end = fill_the_node(f"{run.prefix}-filler")  # type: ignore[attr-defined]
    start_verbose(run)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        landing = ""
        deadline = time.monotonic() + ESTIMATE_WITHIN_S
        while landing.count("expected to start at") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            try:
                async with session.get(run.url) as response:
                    landing = await response.text()
            except aiohttp.ClientError:
                landing = ""
        assert landing.count("expected to start at") == 2, landing[-2000:] + run.text()[-3000:]

        # What the organisers see names each job: it agrees with squeue --start. The first in line waits for
        # Resources, until the filler ends; Slurm expects the one behind it (Priority) no sooner.
        _, rows = status_json(run)
        slurm = expected_starts()
        reasons = []
        for account in accounts:
            match = JOB_EXPECTED_RE.search(rows[account.id]["reason"] or "")
            assert match, rows[account.id]
            job_id, reason, clock, minutes = int(match[1]), match[2], match[3], int(match[4])
            assert job_id in slurm, (job_id, slurm)
            slurm_reason, slurm_start = slurm[job_id]
            assert reason == slurm_reason, (reason, slurm_reason)
            assert clock == time.strftime("%H:%M", time.localtime(slurm_start)), (clock, slurm_start)
            assert abs(minutes * 60 - (slurm_start - time.time())) <= 90, (minutes, slurm_start)
            assert slurm_start >= filler_end - 60, (slurm_start, filler_end)
            if reason == "Resources":
                assert abs(slurm_start - filler_end) <= 60, (slurm_start, filler_end)
            reasons.append(reason)
        assert "Resources" in reasons and set(reasons) <= {"Resources", "Priority"}, reasons
        assert sorted(shown(landing)) == sorted(shown(r["reason"])[0] for r in rows.values())

        # The participant's own page, after signing in.
        account = accounts[0]
        async with session.get(f"{run.url}login") as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)
        async with session.post(f"{run.url}login", data={"csrf": csrf, "account": account.id,
                                                         "password": account.password}) as response:
            me = await response.text()
        assert EXPECTED_RE.search(me), me

        headers = {"Authorization": aiohttp.encode_basic_auth("admin", admin_password(run))}
        async with session.get(f"{run.url}admin/api/desktops", headers=headers) as response:
            admin_rows = (await response.json())["desktops"]
        assert {r["account"]: shown(r["reason"]) for r in admin_rows} == {a.id: shown(rows[a.id]["reason"])
                                                                          for a in accounts}

    # One shared squeue snapshot serves every account's poll (each polls once a second while queued): the
    # squeue runs are at least QUEUE_TTL_S apart, and no account's job is looked up on its own.
    commands = commands_since_last_submit(run.text())
    squeues = [at for at, argv in commands if argv.startswith("squeue ")]
    assert len(squeues) >= 3, commands
    gaps = [b - a for a, b in itertools.pairwise(squeues)]
    assert min(gaps) >= QUEUE_TTL_S - 0.01, f"{len(squeues)} squeue for {len(accounts)} accounts, gaps {gaps}"
    assert not [argv for _, argv in commands if argv.startswith("scontrol show job")
                or re.search(r" (-j|--jobs)[ =]", argv)], commands

    # The node is free again: the desktops start.
    subprocess.run(["scancel", f"--name={run.prefix}-filler"], check=True, timeout=30)  # type: ignore[attr-defined]
    cancelled = time.monotonic()
    await asyncio.gather(*(handshake_until_ok(run.ws_url(a), a.password, timeout_s=60) for a in accounts))
    print(f"\n{len(squeues)} squeue in {squeues[-1] - squeues[0]:.1f} s for {len(accounts)} queued desktops; "
          f"both ready {time.monotonic() - cancelled:.1f} s after the filler went")


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
        passwords = (account.password, view_only_password(run.state_dir, account.id))
        assert not any(p in text for p in passwords)
        table = subprocess.run([sys.executable, "-m", "gateway", "status", "--state-dir", str(run.state_dir)],
                               capture_output=True, text=True, timeout=30).stdout
        assert "Xvnc exited before it listened" in table and not any(p in table for p in passwords)
        async with aiohttp.ClientSession() as session:
            # The admin page shows each row's reason (web/static/admin.js), the output's tail with it.
            headers = {"Authorization": aiohttp.encode_basic_auth("admin", admin_password(run))}
            async with session.get(f"{run.url}admin/api/desktops", headers=headers) as response:
                assert response.status == 200
                admin = await response.text()
            (admin_row,) = [r for r in json.loads(admin)["desktops"] if r["account"] == account.id]
            assert "last output:" in (admin_row["reason"] or ""), admin_row
            assert "Xvnc exited before it listened" in (admin_row["output_tail"] or ""), admin_row
            assert not any(p in admin for p in passwords)
            # Participants see that it restarts, not the job's output.
            async with session.get(f"{run.url}api/desktops") as response:
                public = json.dumps(await response.json())
        assert "last output" not in public and "Xvnc exited" not in public
