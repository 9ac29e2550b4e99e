"""Pure parsers for the output of Slurm 22.05 commands (no I/O, no subprocesses).

Each function takes the text a command printed and returns data, or raises ``ValueError`` when the text is
not what the command prints. Callers treat a ``ValueError`` (like a failed or timed-out command) as "don't
know", never as "the job is gone": only positive evidence, such as :func:`is_invalid_job_id`, means gone.

The formats parsed here are the ones the gateway asks for:

* ``sbatch --parsable``                                        -> :func:`parse_job_id`
* ``squeue --noheader --format=%i|%T|%N|%r|%j|%u``             -> :func:`parse_squeue`
* ``scontrol show job -o ID``                                  -> :func:`parse_scontrol_job`
* ``scontrol show partition -o [NAME]``                        -> :func:`parse_scontrol_partitions`
* ``sinfo --noheader --format=%P|%a|%D|%t|%G``                 -> :func:`parse_sinfo_partitions`
* ``sinfo --noheader --Node --format=%N|%o``                     -> :func:`parse_node_addresses`
* ``squeue --format=%S|%e|`` + SQUEUE_FORMAT (times in front)    -> :func:`split_times`
"""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass

__all__ = [
    "SQUEUE_FORMAT",
    "SINFO_PARTITION_FORMAT",
    "SINFO_NODE_FORMAT",
    "TIMES_FORMAT",
    "JobState",
    "JobInfo",
    "PartitionInfo",
    "job_state",
    "parse_job_id",
    "parse_squeue",
    "parse_scontrol_job",
    "parse_scontrol_jobs",
    "parse_scontrol_partitions",
    "parse_slurm_duration",
    "parse_sinfo_partitions",
    "parse_node_addresses",
    "is_invalid_job_id",
    "JobTimes",
    "parse_slurm_time",
    "split_times",
]

#: The ``--format`` for ``squeue`` that :func:`parse_squeue` reads.
SQUEUE_FORMAT = "%i|%T|%N|%r|%j|%u"
#: The ``--format`` for ``sinfo`` that :func:`parse_sinfo_partitions` reads.
SINFO_PARTITION_FORMAT = "%P|%a|%D|%t|%G"
#: The ``--format`` for ``sinfo --Node`` that :func:`parse_node_addresses` reads.
SINFO_NODE_FORMAT = "%N|%o"
#: Columns put before SQUEUE_FORMAT for :func:`split_times`: start (expected while pending, as
#: ``squeue --start`` shows it) and end time.
TIMES_FORMAT = "%S|%e|"


class JobState(enum.Enum):
    """What the gateway needs to know about a Slurm job state."""

    PENDING = "pending"  # queued, held, requeued, configuring: not running yet, may still run
    RUNNING = "running"  # has its nodes (also suspended/stopped: it holds them and may continue)
    COMPLETING = "completing"  # ending; processes may still be cleaned up on the node
    ENDED = "ended"  # finished for good (completed, cancelled, failed, timeout, node failure, ...)
    UNKNOWN = "unknown"  # a state this module does not know


# Long names (squeue %T, scontrol JobState=) and the short codes (squeue %t) of Slurm 22.05.
_STATES: dict[str, JobState] = {}
for _names, _state in (
    (
        ("PENDING", "PD", "CONFIGURING", "CF", "REQUEUED", "RQ", "REQUEUE_HOLD", "RH", "REQUEUE_FED", "RF",
         "RESV_DEL_HOLD", "RD", "SPECIAL_EXIT", "SE"),
        JobState.PENDING,
    ),
    (
        ("RUNNING", "R", "SUSPENDED", "S", "STOPPED", "ST", "SIGNALING", "SI", "RESIZING", "RS"),
        JobState.RUNNING,
    ),
    (("COMPLETING", "CG", "STAGE_OUT", "SO"), JobState.COMPLETING),
    (
        ("COMPLETED", "CD", "CANCELLED", "CA", "FAILED", "F", "TIMEOUT", "TO", "NODE_FAIL", "NF",
         "PREEMPTED", "PR", "BOOT_FAIL", "BF", "DEADLINE", "DL", "OUT_OF_MEMORY", "OOM", "REVOKED", "RV"),
        JobState.ENDED,
    ),
):
    for _name in _names:
        _STATES[_name] = _state
del _names, _state, _name


def job_state(text: str) -> JobState:
    """Map a Slurm job state (``RUNNING``, ``R``, ``CANCELLED by 0``, ``COMPLETING+``) to a :class:`JobState`.

    A state this module does not know gives ``JobState.UNKNOWN``, never an error.
    """
    words = text.strip().split()
    if not words:
        return JobState.UNKNOWN
    return _STATES.get(words[0].rstrip("+").upper(), JobState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One line of ``squeue --format=%i|%T|%N|%r|%j|%u``."""

    job_id: int
    state: JobState
    nodes: str  # Slurm node list expression ("vm", "node[01-02]"); "" while pending
    reason: str  # "None" while running; "Resources", "BeginTime", "JobHeldUser", ... while pending
    name: str
    user: str
    raw_state: str = ""  # the state as Slurm printed it, for messages


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One line of ``sinfo --format=%P|%a|%D|%t|%G`` (a partition has one line per node state)."""

    name: str
    default: bool  # sinfo marks the default partition with a trailing "*"
    available: str  # "up", "down", "drain", "inact"
    node_count: int
    node_state: str  # "idle", "mix", "alloc", "down*", "drain", ...
    gres: str  # "gpu:1", "(null)"


_JOB_ID_RE = re.compile(r"[0-9]+")


def _job_id(text: str, what: str) -> int:
    if not _JOB_ID_RE.fullmatch(text):
        raise ValueError(f"{what}: expected a job id (digits), got {text!r}")
    job_id = int(text)
    if job_id <= 0:
        raise ValueError(f"{what}: job id must be positive, got {text!r}")
    return job_id


def parse_job_id(stdout: str) -> int:
    """The job id from ``sbatch --parsable`` output: ``"123\\n"`` or ``"123;cluster\\n"``.

    Raises ``ValueError`` for anything else (empty output, several lines, a non-integer id).
    """
    lines = [line for line in stdout.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"sbatch --parsable: expected one line, got {stdout!r}")
    job_id, _, cluster = lines[0].strip().partition(";")
    if ";" in cluster:
        raise ValueError(f"sbatch --parsable: expected 'ID' or 'ID;CLUSTER', got {lines[0]!r}")
    return _job_id(job_id, "sbatch --parsable")


def parse_squeue(stdout: str) -> dict[int, JobInfo]:
    """Jobs from ``squeue --noheader --format=%i|%T|%N|%r|%j|%u``, by job id.

    Empty output means no job matched. The job name may contain ``|`` (it is read as everything between
    the reason and the last field, the user name, which cannot). Lines of array or heterogeneous jobs
    (ids like ``12_3`` or ``12+1``) are skipped: the gateway submits only plain jobs. A line with too few
    fields or a malformed id raises ``ValueError``.
    """
    jobs: dict[int, JobInfo] = {}
    for number, line in enumerate(stdout.splitlines(), start=1):
        if not line.strip():
            continue
        head = line.split("|", 4)
        if len(head) != 5 or "|" not in head[4]:
            raise ValueError(f"squeue line {number}: expected 6 '|'-separated fields, got {line!r}")
        job_id_text, raw_state, nodes, reason, rest = head
        name, _, user = rest.rpartition("|")
        job_id_text = job_id_text.strip()
        if re.fullmatch(r"[0-9]+[_+].*", job_id_text):
            continue
        job_id = _job_id(job_id_text, f"squeue line {number}")
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=job_state(raw_state),
            nodes=nodes.strip(),
            reason=reason.strip(),
            name=name,
            user=user.strip(),
            raw_state=raw_state.strip(),
        )
    return jobs


# A field starts at a word that looks like a Slurm key followed by "=": capitalised, may contain ":" and "/"
# ("AllocNode:Sid=", "CPUs/Task=", "ReqB:S:C:T="). Other words belong to the previous field's value, which
# is how values with spaces (Command=/path/my job.sh, JobName=gpu desk, Reason=...) come out whole.
_KEY_RE = re.compile(r"([A-Z][A-Za-z0-9_]*(?:[:/][A-Za-z0-9_]+)*)=(.*)", re.DOTALL)


def parse_scontrol_job(stdout: str) -> dict[str, str]:
    """The fields of one job from ``scontrol show job -o ID`` (one line of ``Key=Value`` pairs).

    Values keep their spaces (``Command=/tmp/job with space.sh``) as long as no word inside them looks
    like ``Key=`` with a capital first letter; values are returned as printed (``(null)``, ``N/A``,
    ``Unknown`` and the empty string are not translated). Raises ``ValueError`` if the output is not
    exactly one job (use :func:`parse_scontrol_jobs` for several) or has no ``JobId``.
    """
    jobs = parse_scontrol_jobs(stdout)
    if len(jobs) != 1:
        raise ValueError(f"scontrol show job -o: expected one job, got {len(jobs)}")
    return jobs[0]


def _scontrol_records(stdout: str, what: str, key: str) -> list[tuple[str, dict[str, str]]]:
    """The records of ``scontrol show WHAT -o`` output (one line each), as (where, fields); each must have ``key``."""
    records = []
    for number, line in enumerate(stdout.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"scontrol show {what} line {number}"
        fields = _key_values(line, where)
        if key not in fields:
            raise ValueError(f"{where}: no {key} field: {line[:80]!r}")
        records.append((where, fields))
    return records


def parse_scontrol_jobs(stdout: str) -> list[dict[str, str]]:
    """Every job in ``scontrol show job -o`` output, one line per job (array tasks are separate lines)."""
    jobs = []
    for where, fields in _scontrol_records(stdout, "job", "JobId"):
        _job_id(fields["JobId"], where)
        jobs.append(fields)
    return jobs


def parse_scontrol_partitions(stdout: str) -> list[dict[str, str]]:
    """Every partition in ``scontrol show partition -o`` output (one line each), as its fields."""
    return [fields for _, fields in _scontrol_records(stdout, "partition", "PartitionName")]


def _key_values(line: str, where: str) -> dict[str, str]:
    """The ``Key=Value`` words of one line of ``scontrol show ... -o`` (see _KEY_RE)."""
    fields: dict[str, str] = {}
    key: str | None = None
    for word in line.strip().split(" "):
        match = _KEY_RE.fullmatch(word)
        if match and match.group(1) not in fields:
            key = match.group(1)
            fields[key] = match.group(2)
        elif key is None:
            raise ValueError(f"{where}: does not start with Key=Value: {line!r}")
        else:
            fields[key] += " " + word
    return fields


_DURATION_RE = re.compile(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")


def parse_slurm_duration(text: str) -> float | None:
    """Seconds of a Slurm duration as ``scontrol`` prints a TimeLimit or MaxTime (``00:30:00``,
    ``7-00:00:00``, ``1-12``, ``45``); None for no limit (``UNLIMITED``, ``INFINITE``, ``NONE``,
    ``Partition_Limit``). ValueError for anything else."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "PARTITION_LIMIT"):
        return None
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a Slurm duration: {text!r}")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = first, second or 0, third or 0
    elif third is not None:  # HH:MM:SS
        hours, minutes, seconds = first, second, third
    else:  # MM, MM:SS
        hours, minutes, seconds = 0, first, second or 0
    return float((((days or 0) * 24 + (hours or 0)) * 60 + (minutes or 0)) * 60 + seconds)


def parse_sinfo_partitions(stdout: str) -> list[PartitionInfo]:
    """Rows of ``sinfo --noheader --format=%P|%a|%D|%t|%G``, in the order sinfo printed them."""
    rows = []
    for number, line in enumerate(stdout.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split("|")
        if len(fields) != 5:
            raise ValueError(f"sinfo line {number}: expected 5 '|'-separated fields, got {line!r}")
        partition, available, count, state, gres = fields
        if not count.isdigit():
            raise ValueError(f"sinfo line {number}: node count is not a number: {count!r}")
        rows.append(
            PartitionInfo(
                name=partition.rstrip("*"),
                default=partition.endswith("*"),
                available=available,
                node_count=int(count),
                node_state=state,
                gres=gres,
            )
        )
    return rows


def is_invalid_job_id(stderr: str) -> bool:
    """Whether ``squeue -j ID`` or ``scontrol show job ID`` said the job does not exist (any more).

    This is the positive evidence that a job is gone: slurmctld forgets a job ``MinJobAge`` seconds after
    it ended. A failed command with any other message means "don't know".
    """
    return "Invalid job id specified" in stderr


def parse_node_addresses(stdout: str) -> dict[str, str]:
    """Each node's address (NodeAddr) from ``sinfo --noheader --Node --format=%N|%o``; odd lines are skipped."""
    addresses = {}
    for line in stdout.splitlines():
        name, sep, address = line.strip().partition("|")
        if sep and name and address:
            addresses[name] = address
    return addresses


@dataclass(frozen=True, slots=True)
class JobTimes:
    """A job's start (expected, while it is pending) and end (its time limit), as time.time() values."""

    start: float | None
    end: float | None


def parse_slurm_time(text: str) -> float | None:
    """A Slurm time such as 2026-11-23T09:00:00 (the cluster's local time); None for N/A, Unknown, ..."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?", text):
        return None
    return datetime.datetime.fromisoformat(text).timestamp()


def split_times(stdout: str) -> tuple[dict[int, JobTimes], str]:
    """Lines of ``squeue --format=%S|%e|`` + SQUEUE_FORMAT: each job's times, and the lines parse_squeue reads."""
    times: dict[int, JobTimes] = {}
    rest_lines = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        start, end, rest = (line.split("|", 2) + ["", ""])[:3]
        if start.strip().isdigit():  # no times in front (an squeue that ignored them): a plain line
            rest_lines.append(line)
            continue
        job_id = rest.split("|", 1)[0].strip()
        if job_id.isdigit():
            times[int(job_id)] = JobTimes(parse_slurm_time(start), parse_slurm_time(end))
        rest_lines.append(rest)
    return times, "\n".join(rest_lines)
