"""`gateway up` with backend: slurm on the project's real test cluster (scripts/test-slurm-cluster up).

Real sbatch/squeue/scancel/scontrol, real Xvnc in real jobs, real websockify and Apache; nothing mocked.
Every test uses a job name prefix and reservation of its own and removes its jobs, reservation, users and
processes in ``finally``, even when it fails. Skips without a cluster, unless GATEWAY_REQUIRE_SYSTEM=1.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.common import rfb
from gateway.backends.desktop_users import kill_user_processes
from gateway.backends.slurm_parse import JobState, parse_squeue
from gateway.model.state import StateStore
from gateway.model.tokens import Account, generate_password
from tests.gateway_run import GatewayRun, processes_mentioning
from tests.gateway_run import handshake_until_ok as shared_handshake_until_ok
from tests.os_check import listening_addresses
from tests.system import free_port, require_program, require_slurm_cluster
from tests.test_cockpit import admin_password
from tests.test_isolation import authenticates, revoke, share, view_only_password_on_page

pytestmark = pytest.mark.system

SQUEUE_FORMAT = "%i|%T|%N|%r|%j|%u"
READY_WITHIN_S = 30.0


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    require_slurm_cluster("Xvnc", "vncpasswd", "apache2", "openbox", "xterm")


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
        # Accounts like sl01 are no OS users: unless the test says otherwise, jobs run as the gateway's user.
        # slurm.interface is the default, auto: each job's Xvnc listens on its node's NodeAddr.
        run_as = "" if "run_as:" in extra else "  run_as: gateway\n"
        config = (f"backend: slurm\nslurm:\n  job_name_prefix: {prefix}\n"
                  f"  time_limit_s: 1800\n  event_duration_s: 3600\n{run_as}{extra}")
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


async def test_by_default_a_jobs_xvnc_listens_only_on_its_nodes_slurm_address(slurm_event) -> None:
    """slurm.interface: auto. The gateway connects to the job's node at its NodeAddr; the job's Xvnc listens on
    that address as the node resolves it, and on no other (on the test cluster 127.0.0.1, so 127.0.0.2 of the
    same machine is refused)."""
    accounts = auto_accounts(["la01"])
    run: GatewayRun = slurm_event(accounts)
    run.up(timeout_s=READY_WITHIN_S)
    (info,) = our_jobs(run.prefix)["la01"]  # type: ignore[attr-defined]
    shown = subprocess.run(["scontrol", "show", "node", "-o", info.nodes], capture_output=True, text=True,
                           check=True, timeout=30).stdout
    node_addr = re.search(r"\bNodeAddr=(\S+)", shown).group(1)
    address = socket.getaddrinfo(node_addr, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    port = accounts[0].vnc_port
    assert listening_addresses(port) == {address}  # not 0.0.0.0, nor ::
    other = "127.0.0.2" if address != "127.0.0.2" else "127.0.0.3"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other, port), timeout=5).close()
    await rfb.connect_websocket(run.ws_url(accounts[0]), accounts[0].password, timeout_s=10)
    output = (run.state_dir / "slurm" / "la01" / f"job-{info.job_id}.out").read_text()
    assert f"address {address} port {port}" in output


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
            # Jobs a test submitted as the user (from inside a desktop), then whatever still runs as it.
            subprocess.run(["scancel", "-u", name], capture_output=True, timeout=30)
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


def test_up_refuses_accounts_that_are_no_users_before_starting_anything(tmp_path: Path) -> None:
    """run_as: account is the default: accounts that are no users here stop `up` at once (exit 2)."""
    prefix = f"gwn{os.getpid() % 10000}r{random.randint(100, 999)}"
    shared = tmp_path / "shared"
    accounts = auto_accounts([f"nouser{prefix}a", f"nouser{prefix}b"])
    run = GatewayRun(tmp_path, accounts, f"backend: slurm\nslurm:\n  job_name_prefix: {prefix}\n"
                                         f"  shared_dir: {shared}\n")
    result = subprocess.run(run.argv(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert re.match(rf"gateway: error: {re.escape(str(run.tokens))}:[0-9]+: slurm.run_as is account", line), line
    assert f"nouser{prefix}a, nouser{prefix}b" in line and "slurm.run_as: gateway" in line
    # Nothing half-started: no state dir, no shared dir, no reservation, no job, no process.
    assert not run.state_dir.exists() and not shared.exists()
    assert reservations(prefix) == [] and our_jobs(prefix) == {}
    assert processes_mentioning(str(tmp_path)) == []


def _job_processes(job_id: int) -> dict[int, tuple[str, int]]:
    """What job ``job_id`` runs on this node: {pid: (command name, uid)} of every process whose
    environment names the job (slurmstepd, Slurm's own root helper, is not the job's)."""
    needle = f"\0SLURM_JOB_ID={job_id}\0".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in b"\0" + (entry / "environ").read_bytes():
                comm = (entry / "comm").read_text().strip()
                if comm != "slurmstepd":
                    found[int(entry.name)] = (comm, entry.stat().st_uid)
        except OSError:
            continue
    return found


def _environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").partition("=")[::2] for p in pairs if b"=" in p)


def _as_user(user: str, *argv: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """``argv`` run as ``user`` (runuser: a real login of nobody's choosing, no shell string)."""
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=timeout_s)


def _type_into_xterm(user: str, environment: dict[str, str], text: str) -> None:
    """Type ``text`` and Return into the desktop's terminal as ``user`` would: through its X display."""
    env = ["env", "-i", "PATH=/usr/bin:/bin", f"DISPLAY={environment['DISPLAY']}"]
    if environment.get("XAUTHORITY"):
        env.append(f"XAUTHORITY={environment['XAUTHORITY']}")

    def xdotool(*args: str) -> str:
        result = _as_user(user, *env, "xdotool", *args)
        assert result.returncode == 0, f"xdotool {' '.join(args)}: {result.stderr}"
        return result.stdout

    deadline = time.monotonic() + 20
    while not (windows := xdotool("search", "--onlyvisible", "--class", "xterm").split()):
        assert time.monotonic() < deadline, "no xterm window on the desktop"
        time.sleep(0.3)
    xdotool("windowactivate", "--sync", windows[0])
    xdotool("type", "--delay", "15", text)
    xdotool("key", "Return")


async def test_a_participant_submits_a_job_from_inside_the_desktop_as_their_own_user(slurm_event, os_users) -> None:
    require_program("xdotool")
    require_program("runuser")
    shared = Path(tempfile.mkdtemp(prefix="gw-shared-", dir="/tmp"))
    try:
        accounts = auto_accounts(os_users)
        run: GatewayRun = slurm_event(accounts, f"  run_as: account\n  shared_dir: {shared}\n")
        prefix = run.prefix  # type: ignore[attr-defined]
        run.up(timeout_s=READY_WITHIN_S)
        alice, bob = accounts
        uid = {a.id: int(subprocess.run(["id", "-u", a.id], capture_output=True, text=True).stdout) for a in accounts}
        (info,) = our_jobs(prefix)[alice.id]
        assert info.user == alice.id

        # Everything of the desktop runs as the participant's uid: the job script, Xvnc, the window
        # manager, the terminal (nothing as root, nothing as the gateway's user).
        processes = {}
        deadline = time.monotonic() + 20
        while "xterm" not in {comm for comm, _ in processes.values()}:
            assert time.monotonic() < deadline, f"no terminal in job {info.job_id}: {processes}"
            await asyncio.sleep(0.3)
            processes = _job_processes(info.job_id)
        assert {"Xvnc", "openbox", "xterm"} <= {comm for comm, _ in processes.values()}, processes
        assert {owner for _, owner in processes.values()} == {uid[alice.id]}, processes
        xterm = next(pid for pid, (comm, _) in processes.items() if comm == "xterm")
        # The node is shared: the other participant cannot open this desktop's display (Xvnc -auth).
        display = _environment(xterm)["DISPLAY"]
        intruder = _as_user(bob.id, "env", "-i", "PATH=/usr/bin:/bin", f"DISPLAY={display}", "xdpyinfo")
        assert intruder.returncode != 0 and "unable to open display" in intruder.stderr, intruder
        assert _environment(xterm).get("XAUTHORITY"), "the session has no X cookie"

        # The participant types into the desktop's terminal: the job they submit is theirs.
        inner = f"inner{prefix}"
        _type_into_xterm(alice.id, _environment(xterm), f"sbatch -t 1 -J {inner} --wrap 'sleep 60'")
        deadline = time.monotonic() + 20
        while not (mine := [j for j in parse_squeue(subprocess.run(
                ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"], capture_output=True,
                text=True, timeout=30).stdout).values() if j.name == inner]):
            assert time.monotonic() < deadline, "the job typed into the desktop never reached Slurm"
            await asyncio.sleep(0.3)
        (submitted,) = mine
        assert submitted.user == alice.id and submitted.state in (JobState.PENDING, JobState.RUNNING), submitted
        print(f"\njob {submitted.job_id} submitted from {alice.id}'s desktop: user {submitted.user}, "
              f"{submitted.raw_state}")

        # The shared dir: traversable only; each account's files readable by its user (and root) only.
        assert shared.stat().st_uid == os.geteuid() and (shared.stat().st_mode & 0o777) == 0o711
        for account in accounts:
            (job,) = our_jobs(prefix)[account.id]
            workdir = shared / account.id
            files = [workdir / ".vnc-secret", workdir / f"report-{job.job_id}"]
            assert workdir.stat().st_uid == uid[account.id] and (workdir.stat().st_mode & 0o777) == 0o700
            for path in files:
                assert path.stat().st_uid == uid[account.id] and (path.stat().st_mode & 0o777) == 0o600, path
            other = bob if account is alice else alice
            for path in files:
                attempt = _as_user(other.id, "cat", str(path))
                assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, (other.id, path)
                assert account.password not in attempt.stdout
            assert _as_user(account.id, "cat", str(files[1])).returncode == 0  # its own: yes
    finally:
        shutil.rmtree(shared, ignore_errors=True)


async def test_a_revoked_share_link_no_longer_opens_the_running_job_desktop(slurm_event, os_users) -> None:
    """Revoking a share link rewrites the job's secret in the shared dir; the running job notices within seconds
    and makes its password file again, which Xvnc reads at every authentication. The job is not restarted."""
    shared = Path(tempfile.mkdtemp(prefix="gw-shared-", dir="/tmp"))
    try:
        shared.chmod(0o711)
        (account,) = auto_accounts(os_users[:1])
        run: GatewayRun = slurm_event([account], f"  run_as: account\n  shared_dir: {shared}\n")
        run.up(timeout_s=READY_WITHIN_S)
        (job_id,) = recorded_jobs(run).values()
        admin = admin_password(run)

        handed_out = view_only_password_on_page(share(run, account.id, admin, minutes=60))
        assert await authenticates(account.vnc_port, handed_out)
        assert revoke(run, account.id, admin) == 1
        revoked_at = time.monotonic()
        deadline = revoked_at + 20  # the job looks at its secret every 2 s; the machine may be busy
        while await authenticates(account.vnc_port, handed_out):
            assert time.monotonic() < deadline, "the revoked link's view-only password still opens the desktop"
            await asyncio.sleep(0.5)
        print(f"\nthe revoked link's view-only password refused after {time.monotonic() - revoked_at:.1f} s")
        assert await authenticates(account.vnc_port, account.password)  # the participant is never affected
        fresh = view_only_password_on_page(share(run, account.id, admin, minutes=60))
        assert fresh != handed_out and await authenticates(account.vnc_port, fresh)

        # The same job all along; the secret is still the job's user's alone, and no password reached its output.
        assert recorded_jobs(run) == {account.id: job_id}
        secret = shared / account.id / ".vnc-secret"
        assert secret.stat().st_uid == pwd.getpwnam(account.id).pw_uid and (secret.stat().st_mode & 0o777) == 0o600
        output = (shared / account.id / f"job-{job_id}.out").read_text()
        assert "password file rewritten" in output
        assert not any(p in output for p in (handed_out, fresh, account.password))
        assert run.terminate(timeout_s=60) == 0
        assert wait_no_jobs(run.prefix, timeout_s=5) == {}  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


async def test_a_report_forged_by_the_participant_is_not_believed(os_users, tmp_path: Path, caplog) -> None:
    """The job's report lives in the participant's directory: a host or port written there is refused."""
    from gateway.backends.slurm import SlurmBackend
    from gateway.model.config import parse_config

    require_program("runuser")
    prefix = f"gwf{os.getpid() % 10000}r{random.randint(100, 999)}"
    shared = Path(tempfile.mkdtemp(prefix="gw-shared-", dir="/tmp"))
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    config = parse_config(f"backend: slurm\nslurm:\n  job_name_prefix: {prefix}\n  interface: 127.0.0.1\n"
                          f"  time_limit_s: 600\n  event_duration_s: 3600\n  shared_dir: {shared}\n")
    (account,) = auto_accounts(os_users[:1])
    backend = SlurmBackend(config, state_dir)
    state = None
    try:
        await backend.open([account])
        state = await backend.start(account)
        deadline = time.monotonic() + READY_WITHIN_S
        while (result := await backend.poll(account, state)).endpoint is None:
            assert time.monotonic() < deadline, result
            await asyncio.sleep(0.3)
        assert (result.endpoint.host, result.endpoint.port) == ("127.0.0.1", account.vnc_port)
        report = Path(state["workdir"]) / f"report-{state['job_id']}"
        node = report.read_text().split("node=")[1].split()[0]

        # The participant's user rewrites the report: elsewhere, and here on another port.
        decoy = free_port()
        for forged in (f"job={state['job_id']}\nnode=elsewhere\nhost=10.66.0.1\nport={decoy}\ndisplay=1\n",
                       f"job={state['job_id']}\nnode={node}\nhost=127.0.0.1\nport={decoy}\ndisplay=1\n"):
            written = _as_user(account.id, "sh", "-c", 'printf %s "$1" >"$2.tmp" && mv -f "$2.tmp" "$2"', "forge",
                               forged, str(report))
            assert written.returncode == 0, written.stderr
            backend.queue.invalidate()
            result = await backend.poll(account, state)
            assert result.endpoint is None and "report was refused" in result.reason, result
        refused = [r.getMessage() for r in caplog.records if "job report refused" in r.getMessage()]
        assert len(refused) == 1 and "elsewhere" in refused[0], refused
    finally:
        if state is not None:
            await backend.stop(account, state)
        await backend.close(final=True)
        subprocess.run(["scancel", "-n", f"{prefix}-{account.id}"], capture_output=True, timeout=30)
        for name in reservations(prefix):
            subprocess.run(["scontrol", "delete", "reservation", name], capture_output=True, timeout=30)
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
    """SIGKILL what still runs as a user this test created (so userdel can remove it)."""
    import pwd

    asyncio.run(kill_user_processes(pwd.getpwnam(user).pw_uid))
