"""Small helpers shared by the benchmark parts: percentiles, process memory and CPU, ports."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["percentile", "pss_mb", "cpu_seconds", "cpu_seconds_total", "descendants", "machine", "CLK_TCK",
           "latency_with_losses", "spread"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_with_losses(rtts_ms: Sequence[float], lost: int, duration_s: float) -> dict[str, object]:
    """p50 and p99 of the round trips, each lost event counted as one of ``duration_s`` (the run's length).

    A lost event is input the participant typed that never came back within the run: at least
    as bad as the slowest possible echo, so it may not vanish from the percentiles. ``p99_echoed_ms``
    is the p99 of the echoed events alone, for comparison.
    """
    lost_ms = duration_s * 1000
    samples = list(rtts_ms) + [lost_ms] * lost
    total = len(samples)
    return {"p50_ms": _round(percentile(samples, 50)), "p99_ms": _round(percentile(samples, 99)),
            "p99_echoed_ms": _round(percentile(rtts_ms, 99)), "samples": len(rtts_ms), "lost_events": lost,
            "lost_share": round(lost / total, 4) if total else None}


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """min, median and max of the repetitions of one point (None where a run gave no figure)."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return {"min": None, "median": None, "max": None, "n": 0}
    mid = len(known) // 2
    median = known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2
    return {"min": known[0], "median": _round(median), "max": known[-1], "n": len(known)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (by parent pid), as they are now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pss_mb(pids: Iterable[int]) -> float:
    """Sum of Pss from /proc/PID/smaps_rollup, in MB (processes that vanished count 0)."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """utime + stime of each process, in seconds."""
    result = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            result[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return result


def machine() -> dict[str, object]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                  if l.startswith("MemTotal:"))

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()][0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            return "unknown"

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "apache": version(["apache2", "-v"]),
        "xvnc": version(["Xvnc", "-version"]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def cpu_seconds_total(pids: Iterable[int]) -> dict[int, float]:
    """utime + stime + cutime + cstime of each process (reaped children included), in seconds."""
    result = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            result[pid] = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    return result
