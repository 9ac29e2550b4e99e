"""The project's test cluster (``scripts/test-slurm-cluster up``) does what the Slurm backend relies on.

CI runs ``scripts/test-slurm-cluster up`` before the tests. When ``sinfo`` does not answer these tests
skip, or fail under ``GATEWAY_REQUIRE_SYSTEM=1``. Other tests may use the cluster at the same time: every
test touches only its own jobs and reservation, and removes them in ``finally``.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.backends.slurm_parse import (
    JobInfo,
    JobState,
    parse_job_id,
    parse_sinfo_partitions,
    parse_squeue,
)

from tests.system import require_slurm_cluster

pytestmark = pytest.mark.system

SQUEUE_FORMAT = "%i|%T|%N|%r|%j|%u"


def slurm(*argv: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip (or fail under GATEWAY_REQUIRE_SYSTEM=1) unless the test cluster answers."""
    require_slurm_cluster()


@pytest.fixture
def jobs() -> Iterator[Callable[..., int]]:
    """``submit(*sbatch_options, script=...)`` submits a job with a time limit; all are cancelled after the test."""
    submitted: list[int] = []

    def submit(*options: str, script: str = "sleep 300", time_limit: str = "2") -> int:
        result = slurm("sbatch", "--parsable", "-t", time_limit, "-o", "/dev/null", "-e", "/dev/null",
                       "-J", "gateway-test", *options, "--wrap", script)
        job_id = parse_job_id(result.stdout)
        submitted.append(job_id)
        return job_id

    try:
        yield submit
    finally:
        if submitted:
            subprocess.run(["scancel", *map(str, submitted)], capture_output=True, timeout=20)
            for job_id in submitted:
                wait_gone(job_id, timeout_s=30)


def job_info(job_id: int) -> JobInfo | None:
    """The job as squeue shows it, or None when squeue no longer lists it."""
    result = slurm("squeue", "--noheader", "-j", str(job_id), f"--format={SQUEUE_FORMAT}", check=False)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        pytest.fail(f"squeue failed: {result.stderr.strip()}")
    return parse_squeue(result.stdout).get(job_id)


def wait_state(job_id: int, wanted: JobState, timeout_s: float = 15) -> JobInfo:
    deadline = time.monotonic() + timeout_s
    info = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info is not None and info.state is wanted:
            return info
        time.sleep(0.25)
    pytest.fail(f"job {job_id} not {wanted.name} after {timeout_s}s: {info}")


def wait_gone(job_id: int, timeout_s: float = 30) -> None:
    """Wait until the job has ended and left COMPLETING (its processes are gone)."""
    deadline = time.monotonic() + timeout_s
    info = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info is None or info.state is JobState.ENDED:
            return
        time.sleep(0.25)
    pytest.fail(f"job {job_id} still there after {timeout_s}s: {info}")


def test_partitions() -> None:
    rows = parse_sinfo_partitions(slurm("sinfo", "--noheader", "--format=%P|%a|%D|%t|%G").stdout)
    by_name = {row.name: row for row in rows}
    assert {"desktop", "gpu"} <= set(by_name)
    assert by_name["desktop"].default
    assert not by_name["gpu"].default
    assert all(row.available == "up" for row in rows)
    assert "gpu:1" in by_name["gpu"].gres


def test_job_runs_quickly_and_scancel_ends_it(jobs) -> None:
    started = time.monotonic()
    job_id = jobs("-p", "desktop", time_limit="1")
    info = wait_state(job_id, JobState.RUNNING, timeout_s=15)
    assert info.nodes
    assert time.monotonic() - started < 15
    slurm("scancel", str(job_id))
    wait_gone(job_id, timeout_s=20)


def test_scancel_kills_double_forked_process(jobs, tmp_path: Path) -> None:
    """proctrack/cgroup: a process that left the job's session and process tree still dies with the job."""
    seconds = random.randint(4000, 9000)  # a sleep only this test starts
    pid_file = tmp_path / "escaped.pid"
    script = (
        f"(setsid sh -c 'echo $$ > {pid_file}; exec nohup sleep {seconds}' </dev/null >/dev/null 2>&1 &); "
        "sleep 300"
    )
    job_id = jobs(script=script)
    wait_state(job_id, JobState.RUNNING)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        if time.monotonic() > deadline:
            pytest.fail("the job did not start its double-forked sleep")
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:2] == [b"sleep", str(seconds).encode()]
        assert os.getsid(pid) == pid  # its own session: out of the job's session
        slurm("scancel", str(job_id))
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                pytest.fail(f"scancel left the double-forked sleep (pid {pid}) running")
            time.sleep(0.1)
    finally:
        _kill_if_ours(pid, seconds)


def _kill_if_ours(pid: int, seconds: int) -> None:
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", str(seconds).encode()]:
            os.kill(pid, 9)
    except (OSError, ValueError):
        pass


def test_gpu_job_runs(jobs) -> None:
    job_id = jobs("-p", "gpu", "--gres=gpu:1")
    info = wait_state(job_id, JobState.RUNNING)
    detail = slurm("scontrol", "show", "job", "-o", str(job_id)).stdout
    assert "Partition=gpu" in detail
    assert "gres:gpu:1" in detail or "gres/gpu" in detail
    assert info.nodes


def test_job_in_reservation(jobs) -> None:
    node = slurm("sinfo", "--noheader", "-p", "desktop", "--format=%N").stdout.split()[0]
    name = f"gateway-test-{os.getpid()}-{random.randint(0, 99999)}"
    created = False
    try:
        result = slurm("scontrol", "create", "reservation", f"ReservationName={name}", "StartTime=now",
                       "Duration=10", f"Nodes={node}", "Users=root", "Flags=IGNORE_JOBS")
        created = True
        assert name in result.stdout
        shown = slurm("scontrol", "show", "reservation", "-o", name).stdout
        assert f"ReservationName={name}" in shown and "State=ACTIVE" in shown
        job_id = jobs(f"--reservation={name}")
        wait_state(job_id, JobState.RUNNING, timeout_s=20)
        assert f"Reservation={name}" in slurm("scontrol", "show", "job", "-o", str(job_id)).stdout
        slurm("scancel", str(job_id))
        wait_gone(job_id)
    finally:
        if created:
            slurm("scontrol", "delete", "reservation", name, check=False)
    result = slurm("scontrol", "show", "reservation", "-o", name, check=False)
    assert f"ReservationName={name}" not in result.stdout
