"""Parsers of Slurm 22.05 output: on output recorded from the test cluster, and on the live commands.

The recorded text below was captured from ``scripts/test-slurm-cluster up`` (Slurm 22.05.8, Debian 12,
node ``vm``) in November 2026.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from gateway.backends.slurm_parse import (
    SINFO_PARTITION_FORMAT,
    SQUEUE_FORMAT,
    JobInfo,
    JobState,
    PartitionInfo,
    is_invalid_job_id,
    job_state,
    parse_job_id,
    parse_scontrol_job,
    parse_scontrol_jobs,
    parse_scontrol_partitions,
    parse_sinfo_partitions,
    parse_slurm_duration,
    parse_squeue,
)
from tests.system import require_slurm_cluster

# squeue --noheader --format=%i|%T|%N|%r|%j|%u  (a running job, a running gpu job whose name has a space,
# one waiting for --begin, one held, one waiting for the only GPU)
SQUEUE_RECORDED = """\
3|PENDING||BeginTime|later|root
4|PENDING||JobHeldUser|held|root
1|RUNNING|vm|None|desk-alice|root
5|PENDING||Resources|gpu2|root
2|RUNNING|vm|None|gpu desk|root
"""

# the same, a moment after scancel 1 2 3 4 5 and a new job in a reservation
SQUEUE_COMPLETING = """\
1|COMPLETING|vm|None|desk-alice|root
6|PENDING||Resources|wrap|root
2|COMPLETING|vm|None|gpu desk|root
"""

SCONTROL_RUNNING = (
    "JobId=1 JobName=desk-alice UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 Nice=0 "
    "Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:02 TimeLimit=00:05:00 TimeMin=N/A SubmitTime=2026-11-21T21:58:26 "
    "EligibleTime=2026-11-21T21:58:26 AccrueTime=2026-11-21T21:58:26 StartTime=2026-11-21T21:58:26 "
    "EndTime=2026-11-21T22:03:26 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-21T21:58:26 Scheduler=Main Partition=desktop AllocNode:Sid=localhost:5184 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 "
    "CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* "
    "CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/cap/job with space.sh "
    "WorkDir=/tmp/cap StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= \n"
)

SCONTROL_GPU = (
    "JobId=2 JobName=gpu desk UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901758 Nice=0 "
    "Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:01 TimeLimit=00:05:00 TimeMin=N/A SubmitTime=2026-11-21T21:58:26 "
    "EligibleTime=2026-11-21T21:58:26 AccrueTime=2026-11-21T21:58:26 StartTime=2026-11-21T21:58:27 "
    "EndTime=2026-11-21T22:03:27 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-21T21:58:27 Scheduler=Main Partition=gpu AllocNode:Sid=localhost:5184 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 "
    "CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* "
    "CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp/cap "
    "StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= TresPerNode=gres:gpu:1 \n"
)

SCONTROL_HELD = (
    "JobId=4 JobName=held UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=0 Nice=0 Account=(null) "
    "QOS=(null) JobState=PENDING Reason=JobHeldUser Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:05:00 TimeMin=N/A SubmitTime=2026-11-21T21:58:26 "
    "EligibleTime=Unknown AccrueTime=Unknown StartTime=Unknown EndTime=Unknown Deadline=N/A SuspendTime=None "
    "SecsPreSuspend=0 LastSchedEval=2026-11-21T21:58:26 Scheduler=Main Partition=desktop "
    "AllocNode:Sid=localhost:5184 ReqNodeList=(null) ExcNodeList=(null) NodeList= NumNodes=1 NumCPUs=1 "
    "NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=1M,node=1,billing=1 Socks/Node=* "
    "NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) "
    "DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) "
    "WorkDir=/tmp/cap StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= \n"
)

SCONTROL_CANCELLED_IN_RESERVATION = (
    "JobId=6 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901755 Nice=0 "
    "Account=(null) QOS=(null) JobState=CANCELLED Reason=Resources Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:02:00 TimeMin=N/A "
    "SubmitTime=2026-11-21T21:58:40 EligibleTime=2026-11-21T21:58:40 AccrueTime=2026-11-21T21:58:40 "
    "StartTime=2026-11-21T21:58:42 EndTime=2026-11-21T21:58:42 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-21T21:58:42 Scheduler=Main Partition=desktop AllocNode:Sid=localhost:5184 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList= NumNodes=1 NumCPUs=1 NumTasks=N/A CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=1M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 Reservation=gwtest "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp/cap "
    "StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= \n"
)

SINFO_IDLE = "desktop*|up|1|idle|gpu:1\ngpu|up|1|idle|gpu:1\n"
SINFO_MIX = "desktop*|up|1|mix|gpu:1\ngpu|up|1|mix|gpu:1\n"

# stderr of `scontrol show job -o 99999` and `squeue -j 99999` (exit status 1 both)
INVALID_JOB_STDERR = "slurm_load_jobs error: Invalid job id specified\n"
# stderr of `sbatch -p nosuch` (exit status 1)
SBATCH_BAD_PARTITION_STDERR = (
    "sbatch: error: invalid partition specified: nosuch\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
)


# --- recorded output ----------------------------------------------------------------------------------


def test_parse_job_id() -> None:
    assert parse_job_id("1\n") == 1
    assert parse_job_id("123;cluster\n") == 123
    assert parse_job_id("  42  ") == 42
    for bad in ("", "\n", "abc\n", "12.5", "-3", "0", "1\n2\n", "1;a;b", ";cluster", "12 13",
                SBATCH_BAD_PARTITION_STDERR):
        with pytest.raises(ValueError):
            parse_job_id(bad)


def test_parse_squeue_recorded() -> None:
    jobs = parse_squeue(SQUEUE_RECORDED)
    assert set(jobs) == {1, 2, 3, 4, 5}
    assert jobs[1] == JobInfo(1, JobState.RUNNING, "vm", "None", "desk-alice", "root", "RUNNING")
    assert jobs[2].name == "gpu desk" and jobs[2].state is JobState.RUNNING
    assert jobs[3].state is JobState.PENDING and jobs[3].reason == "BeginTime" and jobs[3].nodes == ""
    assert jobs[4].reason == "JobHeldUser"
    assert jobs[5].reason == "Resources"
    completing = parse_squeue(SQUEUE_COMPLETING)
    assert completing[1].state is JobState.COMPLETING
    assert completing[6].state is JobState.PENDING


def test_parse_squeue_edge_cases() -> None:
    assert parse_squeue("") == {}
    assert parse_squeue("\n") == {}
    # A name with "|" in it: the user is the last field.
    assert parse_squeue("7|RUNNING|vm|None|a|b|alice\n")[7].name == "a|b"
    # Array and heterogeneous job lines are skipped.
    assert parse_squeue("8_1|RUNNING|vm|None|arr|root\n9+0|RUNNING|vm|None|het|root\n") == {}
    for bad in ("1|RUNNING|vm\n", "x|RUNNING|vm|None|n|root\n", "slurm_load_jobs error: Invalid job id specified"):
        with pytest.raises(ValueError):
            parse_squeue(bad)


def test_parse_scontrol_job_recorded() -> None:
    job = parse_scontrol_job(SCONTROL_RUNNING)
    assert job["JobId"] == "1"
    assert job["JobName"] == "desk-alice"
    assert job["JobState"] == "RUNNING"
    assert job["NodeList"] == "vm" and job["BatchHost"] == "vm"
    assert job["Command"] == "/tmp/cap/job with space.sh"
    assert job["WorkDir"] == "/tmp/cap"
    assert job["AllocNode:Sid"] == "localhost:5184"
    assert job["CPUs/Task"] == "1"
    assert job["ReqB:S:C:T"] == "0:0:*:*"
    assert job["TRES"] == "cpu=1,node=1,billing=1"
    assert job["Power"] == ""
    assert job_state(job["JobState"]) is JobState.RUNNING

    gpu = parse_scontrol_job(SCONTROL_GPU)
    assert gpu["JobName"] == "gpu desk"
    assert gpu["TresPerNode"] == "gres:gpu:1"
    assert gpu["Partition"] == "gpu"

    held = parse_scontrol_job(SCONTROL_HELD)
    assert held["JobState"] == "PENDING" and held["Reason"] == "JobHeldUser"
    assert held["NodeList"] == "" and held["StartTime"] == "Unknown"

    cancelled = parse_scontrol_job(SCONTROL_CANCELLED_IN_RESERVATION)
    assert cancelled["Reservation"] == "gwtest"
    assert job_state(cancelled["JobState"]) is JobState.ENDED


def test_parse_scontrol_errors_and_several_jobs() -> None:
    assert [j["JobId"] for j in parse_scontrol_jobs(SCONTROL_RUNNING + SCONTROL_GPU)] == ["1", "2"]
    with pytest.raises(ValueError):
        parse_scontrol_job(SCONTROL_RUNNING + SCONTROL_GPU)
    for bad in ("", INVALID_JOB_STDERR, "JobName=x JobState=RUNNING", "JobId=abc JobName=x"):
        with pytest.raises(ValueError):
            parse_scontrol_job(bad)


def test_parse_sinfo_recorded() -> None:
    rows = parse_sinfo_partitions(SINFO_IDLE)
    assert rows == [
        PartitionInfo("desktop", True, "up", 1, "idle", "gpu:1"),
        PartitionInfo("gpu", False, "up", 1, "idle", "gpu:1"),
    ]
    assert [r.node_state for r in parse_sinfo_partitions(SINFO_MIX)] == ["mix", "mix"]
    with pytest.raises(ValueError):
        parse_sinfo_partitions("desktop*|up|x|idle|gpu:1\n")
    with pytest.raises(ValueError):
        parse_sinfo_partitions("desktop*|up|1\n")


# scontrol show partition -o  (the default partition, and one made with `scontrol create PartitionName=gwexp
# Nodes=vm MaxTime=00:40:00 State=UP`)
SCONTROL_PARTITIONS = (
    "PartitionName=desktop AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=7-00:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 "
    "RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=1 "
    "SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
    "TRES=cpu=8,mem=1M,node=1,billing=8\n"
    "PartitionName=gwexp AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=00:40:00 MinNodes=1 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 "
    "RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=1 "
    "SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
    "TRES=cpu=8,mem=1M,node=1,billing=8\n"
)


def test_parse_scontrol_partitions_recorded() -> None:
    desktop, short = parse_scontrol_partitions(SCONTROL_PARTITIONS)
    assert (desktop["PartitionName"], desktop["Default"], desktop["MaxTime"]) == ("desktop", "YES", "7-00:00:00")
    assert (short["PartitionName"], short["Default"], short["MaxTime"]) == ("gwexp", "NO", "00:40:00")
    assert short["TRES"] == "cpu=8,mem=1M,node=1,billing=8"
    for bad in ("Partition gwexp not found", "MaxTime=1:00:00 State=UP"):
        with pytest.raises(ValueError):
            parse_scontrol_partitions(bad)


def test_slurm_durations_as_scontrol_prints_them() -> None:
    assert parse_slurm_duration("00:40:00") == 2400
    assert parse_slurm_duration("7-00:00:00") == 7 * 86400
    assert parse_slurm_duration("1-02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert parse_slurm_duration("1-12") == 36 * 3600
    assert parse_slurm_duration("45") == 45 * 60
    assert parse_slurm_duration("05:30") == 330
    for unlimited in ("UNLIMITED", "INFINITE", "NONE", "Partition_Limit"):
        assert parse_slurm_duration(unlimited) is None
    for bad in ("", "soon", "1:2:3:4", "-5"):
        with pytest.raises(ValueError):
            parse_slurm_duration(bad)


def test_job_states() -> None:
    assert job_state("PENDING") is JobState.PENDING
    assert job_state("PD") is JobState.PENDING
    assert job_state("CONFIGURING") is JobState.PENDING
    assert job_state("REQUEUE_HOLD") is JobState.PENDING
    assert job_state("R") is JobState.RUNNING
    assert job_state("SUSPENDED") is JobState.RUNNING
    assert job_state("COMPLETING") is JobState.COMPLETING
    assert job_state("CG") is JobState.COMPLETING
    for ended in ("COMPLETED", "CANCELLED", "CANCELLED by 0", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                  "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "CA", "CD", "TO"):
        assert job_state(ended) is JobState.ENDED, ended
    assert job_state("") is JobState.UNKNOWN
    assert job_state("SOMETHING_NEW") is JobState.UNKNOWN


def test_is_invalid_job_id() -> None:
    assert is_invalid_job_id(INVALID_JOB_STDERR)
    assert not is_invalid_job_id(SBATCH_BAD_PARTITION_STDERR)
    assert not is_invalid_job_id("slurm_load_jobs error: Unable to contact slurm controller (connect failure)")


# --- the live commands --------------------------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20)


@pytest.mark.system
def test_live_commands() -> None:
    require_slurm_cluster()
    rows = parse_sinfo_partitions(_run("sinfo", "--noheader", f"--format={SINFO_PARTITION_FORMAT}").stdout)
    assert {"desktop", "gpu"} <= {row.name for row in rows}

    submitted = _run("sbatch", "--parsable", "-t", "1", "-o", "/dev/null", "-J", "parse test|x",
                     "--wrap", "sleep 120")
    assert submitted.returncode == 0, submitted.stderr
    job_id = parse_job_id(submitted.stdout)
    try:
        deadline = time.monotonic() + 15
        while True:
            jobs = parse_squeue(_run("squeue", "--noheader", "-j", str(job_id), f"--format={SQUEUE_FORMAT}").stdout)
            if jobs[job_id].state is JobState.RUNNING or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        info = jobs[job_id]
        assert info.state is JobState.RUNNING
        assert info.name == "parse test|x"
        assert info.user == "root"
        assert info.nodes and info.reason == "None"

        fields = parse_scontrol_job(_run("scontrol", "show", "job", "-o", str(job_id)).stdout)
        assert fields["JobId"] == str(job_id)
        assert fields["JobName"] == "parse test|x"
        assert job_state(fields["JobState"]) is JobState.RUNNING
        assert fields["NodeList"] == info.nodes
        assert fields["TimeLimit"] == "00:01:00"
    finally:
        _run("scancel", str(job_id))
    deadline = time.monotonic() + 20
    while True:
        result = _run("scontrol", "show", "job", "-o", str(job_id))
        if result.returncode != 0:
            assert is_invalid_job_id(result.stderr)
            break
        state = job_state(parse_scontrol_job(result.stdout)["JobState"])
        if state is JobState.ENDED or time.monotonic() > deadline:
            assert state is JobState.ENDED
            break
        time.sleep(0.25)

    missing = _run("scontrol", "show", "job", "-o", "999999999")
    assert missing.returncode != 0 and is_invalid_job_id(missing.stderr)
