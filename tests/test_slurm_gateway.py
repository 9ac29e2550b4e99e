"""`gateway up` with backend: slurm on the project's real test cluster (scripts/test-slurm-cluster up).

Real sbatch/squeue/scancel/scontrol, real Xvnc in real jobs, real websockify and Apache; nothing mocked.
Every test uses a job name prefix and reservation of its own and removes its jobs, reservation, users and
processes in ``finally``, even when it fails. Skips without a cluster, unless GATEWAY_REQUIRE_SYSTEM=1.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import rfb
from gateway.slurm_parse import JobState, parse_squeue
from gateway.state import StateStore
from gateway.tokens import Account, generate_password
from tests.gateway_run import GatewayRun, processes_mentioning
from tests.gateway_run import handshake_until_ok as shared_handshake_until_ok
from tests.system import free_port, require_program, system_required

pytestmark = pytest.mark.system

SQUEUE_FORMAT = "%i|%T|%N|%r|%j|%u"
READY_WITHIN_S = 30.0


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    for program in ("sinfo", "sbatch", "squeue", "scancel", "scontrol", "Xvnc", "vncpasswd", "apache2",
                    "openbox", "xterm"):
        require_program(program)
    try:
        result = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=15)
        answered, detail = result.returncode == 0, result.stderr.strip()
    except subprocess.TimeoutExpired:
        answered, detail = False, "timed out"
    if not answered:
        message = f"the Slurm test cluster does not answer (run scripts/test-slurm-cluster up): {detail}"
        if system_required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def auto_accounts(names: list[str]) -> list[Account]:
    return [Account(name, "auto", f"/desktop/{name}", free_port(), free_port(), generate_password(), i)
            for i, name in enumerate(names, start=1)]


def our_jobs(prefix: str, *, live_only: bool = True) -> dict[str, list]:
    """Jobs named PREFIX-ACCOUNT by account, (job id, state, user) each; by default only those not ended."""
    result = subprocess.run(["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"],
                            capture_output=True, text=True, timeout=30, check=True)
    jobs: dict[str, list] = {}
    for info in parse_squeue(result.stdout).values():
        if not info.name.startswith(prefix + "-"):
            continue
        if live_only and info.state is JobState.ENDED:
            continue
        jobs.setdefault(info.name[len(prefix) + 1:], []).append(info)
    return jobs


def reservations(prefix: str) -> list[str]:
    result = subprocess.run(["scontrol", "show", "reservation", "-o"], capture_output=True, text=True, timeout=30)
    return [word.split("=", 1)[1] for line in result.stdout.splitlines() for word in line.split()[:1]
            if word.startswith("ReservationName=") and word.split("=", 1)[1].startswith(prefix)]


def recorded_jobs(run: GatewayRun) -> dict[str, int]:
    store = StateStore(run.state_dir / "gateway.db")
    try:
        return {name: int(record.state["job_id"]) for name, record in store.desktops().items()}
    finally:
        store.close()


def recorded_services(run: GatewayRun) -> dict:
    store = StateStore(run.state_dir / "gateway.db")
    try:
        return store.services()
    finally:
        store.close()


def gateway_down(run: GatewayRun, *with_config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(run.state_dir), *with_config],
                          capture_output=True, text=True, timeout=120)


async def handshake_until_ok(run: GatewayRun, account: Account, timeout_s: float = 20) -> None:
    await shared_handshake_until_ok(run.ws_url(account), account.password, timeout_s)


def wait_no_jobs(prefix: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    jobs = our_jobs(prefix)
    while jobs and time.monotonic() < deadline:
        time.sleep(0.3)
        jobs = our_jobs(prefix)
    return jobs


@pytest.fixture
def slurm_event(tmp_path: Path) -> Iterator:
    """``make(accounts, extra_slurm_config)`` -> GatewayRun; its jobs, reservation and processes go afterwards."""
    prefix = f"gwt{os.getpid() % 10000}r{random.randint(100, 999)}"
    runs: list[GatewayRun] = []

    def make(accounts: list[Account], extra: str = "") -> GatewayRun:
        config = (f"backend: slurm\nslurm:\n  job_name_prefix: {prefix}\n  interface: 127.0.0.1\n"
                  f"  time_limit_s: 1800\n  event_duration_s: 3600\n{extra}")
        directory = tmp_path / f"gw{len(runs)}"
        directory.mkdir()
        run = GatewayRun(directory, accounts, config)
        run.prefix = prefix  # type: ignore[attr-defined]
        runs.append(run)
        return run

    try:
        yield make
    finally:
        clean_up_slurm_event(runs, prefix, stop_timeout_s=60)
        for run in runs:
            run.kill_everything()


def clean_up_slurm_event(runs: list[GatewayRun], prefix: str, *, stop_timeout_s: float) -> None:
    """Stop the gateways (SIGTERM, then SIGKILL), then cancel any job and delete any reservation of
    ``prefix`` they left behind."""
    for run in runs:
        if run.process is not None and run.process.poll() is None:
            run.process.terminate()
            try:
                run.process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait()
    leftover = [str(i.job_id) for infos in our_jobs(prefix).values() for i in infos]
    if leftover:
        subprocess.run(["scancel", *leftover], capture_output=True, timeout=30)
        wait_no_jobs(prefix)
    for name in reservations(prefix):
        subprocess.run(["scontrol", "delete", "reservation", name], capture_output=True, timeout=30)


async def test_auto_desktops_in_the_reservation_survive_scancel_and_a_gateway_crash(slurm_event) -> None:
    accounts = auto_accounts(["sl01", "sl02", "sl03"])
    run: GatewayRun = slurm_event(accounts)
    prefix = run.prefix  # type: ignore[attr-defined]

    seconds = run.up(timeout_s=READY_WITHIN_S)
    assert seconds < READY_WITHIN_S
    print(f"\n{len(accounts)} slurm desktops ready in {seconds:.1f} s")
    assert "3 of 3 desktops ready" in run.text()

    # One running job per account, in the reservation the gateway created.
    (reservation,) = reservations(prefix)
    jobs = our_jobs(prefix)
    assert sorted(jobs) == ["sl01", "sl02", "sl03"]
    assert all(len(infos) == 1 and infos[0].state is JobState.RUNNING for infos in jobs.values())
    job_ids = {name: infos[0].job_id for name, infos in jobs.items()}
    assert recorded_jobs(run) == job_ids
    for job_id in job_ids.values():
        shown = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
        assert f"Reservation={reservation} " in shown
        assert "TimeLimit=00:30:00" in shown
    for account in accounts:
        await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
        with pytest.raises(rfb.RfbAuthFailed):
            await rfb.connect_websocket(run.ws_url(account), "wrongpw1", timeout_s=10)
    # The password is on no command line and in no job script or output.
    for pid in processes_mentioning(str(run.state_dir)):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
        assert not any(a.password.encode() in cmdline for a in accounts)
    for path in (run.state_dir / "slurm").rglob("job-*.out"):
        assert not any(a.password.encode() in path.read_bytes() for a in accounts)

    # scancel one desktop: it comes back with a new job, within 30 s; the others keep theirs.
    victim, *bystanders = accounts
    proxies = recorded_services(run)
    started = time.monotonic()
    subprocess.run(["scancel", str(job_ids[victim.id])], check=True, timeout=30)
    while recorded_jobs(run).get(victim.id) in (job_ids[victim.id], None):
        assert time.monotonic() - started < READY_WITHIN_S, run.text()
        await asyncio.sleep(0.2)
    await handshake_until_ok(run, victim, timeout_s=READY_WITHIN_S - (time.monotonic() - started))
    back_s = time.monotonic() - started
    print(f"scancelled desktop reachable again in {back_s:.1f} s")
    assert back_s < READY_WITHIN_S
    new_ids = recorded_jobs(run)
    assert new_ids[victim.id] != job_ids[victim.id]
    for account in bystanders:
        assert new_ids[account.id] == job_ids[account.id]
        assert recorded_services(run)[f"proxy:{account.id}"] == proxies[f"proxy:{account.id}"]
        await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
    assert {name: [i.job_id for i in infos] for name, infos in our_jobs(prefix).items()} == {
        name: [job_id] for name, job_id in new_ids.items()}
    job_ids = new_ids

    # SIGKILL the gateway: the jobs keep running, and the next gateway adopts them.
    assert run.process is not None
    run.process.kill()
    run.process.wait()
    assert {name: infos[0].job_id for name, infos in our_jobs(prefix).items()} == job_ids
    seconds = run.up(timeout_s=READY_WITHIN_S)
    print(f"re-adopted {len(accounts)} slurm desktops in {seconds:.1f} s")
    assert recorded_jobs(run) == job_ids
    assert {name: [i.job_id for i in infos] for name, infos in our_jobs(prefix).items()} == {
        name: [job_id] for name, job_id in job_ids.items()}
    assert run.text().count("desktop adopted") >= 3
    assert reservations(prefix) == [reservation]
    for account in accounts:
        await handshake_until_ok(run, account)

    # gateway down: no job, no reservation it created, no proxy or Apache.
    result = gateway_down(run)
    assert result.returncode == 0, result.stderr
    assert run.process.wait(timeout=60) == 0
    assert wait_no_jobs(prefix, timeout_s=5) == {}
    assert reservations(prefix) == []
    assert processes_mentioning(str(run.state_dir)) == []
    assert not (run.state_dir / "slurm-reservation.json").exists()


async def test_a_named_reservation_is_used_and_left_alone(slurm_event) -> None:
    name = f"gwt-theirs-{os.getpid()}-{random.randint(0, 9999)}"
    node = subprocess.run(["sinfo", "--noheader", "-p", "desktop", "--format=%N"], capture_output=True,
                          text=True, check=True).stdout.split()[0]
    subprocess.run(["scontrol", "create", "reservation", f"ReservationName={name}", "StartTime=now",
                    "Duration=30", f"Nodes={node}", "Users=root", "Flags=IGNORE_JOBS"],
                   check=True, capture_output=True, timeout=30)
    try:
        accounts = auto_accounts(["nr01"])
        run: GatewayRun = slurm_event(accounts, f"  reservation: {name}\n")
        run.up(timeout_s=READY_WITHIN_S)
        (info,) = our_jobs(run.prefix)["nr01"]  # type: ignore[attr-defined]
        shown = subprocess.run(["scontrol", "show", "job", "-o", str(info.job_id)], capture_output=True,
                               text=True).stdout
        assert f"Reservation={name} " in shown
        await rfb.connect_websocket(run.ws_url(accounts[0]), accounts[0].password, timeout_s=10)
        assert run.terminate(timeout_s=60) == 0
        assert wait_no_jobs(run.prefix, timeout_s=5) == {}  # type: ignore[attr-defined]
        shown = subprocess.run(["scontrol", "show", "reservation", "-o", name], capture_output=True, text=True)
        assert f"ReservationName={name} " in shown.stdout  # not ours: still there
    finally:
        subprocess.run(["scontrol", "delete", "reservation", name], capture_output=True, timeout=30)


@pytest.fixture
def os_users() -> Iterator[list[str]]:
    """Two fresh OS users with homes (removed with userdel -r afterwards)."""
    require_program("useradd")
    tag = random.randint(1000, 9999)
    names = [f"gwu{tag}a", f"gwu{tag}b"]
    created = []
    try:
        for name in names:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True,
                           capture_output=True, timeout=30)
            created.append(name)
        yield names
    finally:
        for name in created:
            _kill_processes_of(name)
            subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30)


async def test_run_as_account_submits_as_each_user_and_down_after_a_crash_cleans_up(slurm_event, os_users) -> None:
    shared = Path(tempfile.mkdtemp(prefix="gw-shared-", dir="/tmp"))
    try:
        shared.chmod(0o711)
        accounts = auto_accounts(os_users)
        run: GatewayRun = slurm_event(accounts, f"  run_as: account\n  shared_dir: {shared}\n")
        prefix = run.prefix  # type: ignore[attr-defined]
        seconds = run.up(timeout_s=READY_WITHIN_S)
        print(f"\n{len(accounts)} run_as=account desktops ready in {seconds:.1f} s")
        jobs = our_jobs(prefix)
        for account in accounts:
            (info,) = jobs[account.id]
            assert info.user == account.id  # submitted as the participant's user
            await rfb.connect_websocket(run.ws_url(account), account.password, timeout_s=10)
            uid = int(subprocess.run(["id", "-u", account.id], capture_output=True, text=True).stdout)
            workdir = shared / account.id
            assert workdir.stat().st_uid == uid
            outputs = list(workdir.glob("job-*.out"))
            assert outputs and all(p.stat().st_uid == uid for p in outputs)
            secret = workdir / ".vnc-secret"
            assert secret.stat().st_uid == uid and (secret.stat().st_mode & 0o777) == 0o600
            # Xvnc runs as the user, with the user's home as HOME.
            xvnc = [pid for pid in _pids_of("Xvnc") if f"\0{account.vnc_port}\0".encode()
                    in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert xvnc, f"no Xvnc for {account.id}"
            assert Path(f"/proc/{xvnc[0]}").stat().st_uid == uid
            home = Path(f"/home/{account.id}")
            assert f"HOME={home}".encode() in Path(f"/proc/{xvnc[0]}/environ").read_bytes()
            assert home.stat().st_uid == uid

        # The gateway crashes; `gateway down` (no --config needed) cancels the jobs and deletes its reservation.
        assert run.process is not None
        run.process.kill()
        run.process.wait()
        assert len(reservations(prefix)) == 1 and len(our_jobs(prefix)) == 2
        result = gateway_down(run)
        assert result.returncode == 0, result.stderr
        assert wait_no_jobs(prefix, timeout_s=5) == {}
        assert reservations(prefix) == []
        assert processes_mentioning(str(run.state_dir)) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _pids_of(comm: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _kill_processes_of(user: str) -> None:
    """SIGKILL, by pid, what still runs as a user this test created (so userdel can remove it)."""
    import pwd
    import signal

    uid = pwd.getpwnam(user).pw_uid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue
