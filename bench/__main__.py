"""``python -m bench [--quick]``: run every measurement and write bench/results/."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

from .common import machine
from .desktops import measure_gateway
from .load import Backends, Chain, landing, run_load
from .report import write_report

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("per-account", "shared", "builtin")

PLANS = {
    "quick": {"ready": [10], "serial": [10], "memory": [10], "latency": [20, 50], "duration_s": 5.0,
              "ready_timeout_s": 120, "landing": 500},
    # What a 2-core machine measures in about ten minutes: the 60-desktop and 300-session targets.
    "medium": {"ready": [10, 60], "serial": [60], "memory": [60], "latency": [50, 100, 200, 300],
               "duration_s": 10.0, "ready_timeout_s": 600, "landing": 500},
    "full": {"ready": [10, 60, 200], "serial": [10, 60, 200], "memory": [60, 200], "latency": [50, 100, 200, 300],
             "duration_s": 15.0, "ready_timeout_s": 900, "landing": 500},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, short loads: a few minutes on 2 cores")
    parser.add_argument("--medium", action="store_true",
                        help="60 desktops and up to 300 sessions: about ten minutes on 2 cores")
    parser.add_argument("--only", choices=("ready", "memory", "latency", "landing"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    for program in ("Xvnc", "apache2"):
        if shutil.which(program) is None:
            print(f"{program} is not installed; run scripts/setup first", file=sys.stderr)
            return 2
    plan = PLANS["quick" if args.quick else "medium" if args.medium else "full"]
    parts = set(args.only or ("ready", "memory", "latency", "landing"))
    started = time.monotonic()
    results: dict[str, object] = {
        "machine": machine(),
        "run": {"quick": args.quick, "medium": args.medium, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "plan": plan},
        "ready": {}, "memory": {m: {} for m in MODES}, "latency": {}, "latency_direct": {},
        "max_sessions_p99_under_20ms": {}, "landing": {},
    }
    if parts & {"ready", "memory"}:
        asyncio.run(_desktops(plan, parts, results))
    if parts & {"latency", "landing"}:
        _load(plan, parts, results)
    results["run"]["seconds"] = round(time.monotonic() - started, 1)  # type: ignore[index]
    write_results(results, args.out)
    return 0


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def _desktops(plan: dict, parts: set[str], results: dict) -> None:
    ready, memory = results["ready"], results["memory"]
    sizes = sorted(set(plan["ready"] if "ready" in parts else []) | set(plan["memory"] if "memory" in parts else []))
    for n in sizes:
        want_memory = "memory" in parts and n in plan["memory"]
        _log(f"gateway up, {n} desktops, per-account")
        result = await measure_gateway(n, "per-account", memory=want_memory, timeout_s=plan["ready_timeout_s"])
        entry = ready.setdefault(str(n), {})
        entry.update(seconds=result["ready"]["seconds"], desktop_p50_s=result["ready"]["desktop_p50_s"],
                     desktop_p99_s=result["ready"]["desktop_p99_s"])
        if want_memory:
            memory["per-account"][str(n)] = result["memory"]
        if "ready" in parts and n in plan["serial"]:
            _log(f"gateway up, {n} desktops, start_concurrency 1")
            serial = await measure_gateway(n, "per-account", concurrency=1, memory=False,
                                           timeout_s=plan["ready_timeout_s"])
            entry.update(serial_seconds=serial["ready"]["seconds"], serial_desktop_p50_s=serial["ready"]["desktop_p50_s"])
        if want_memory:
            for mode in ("shared", "builtin"):
                _log(f"gateway up, {n} desktops, {mode}")
                other = await measure_gateway(n, mode, memory=True, timeout_s=plan["ready_timeout_s"])
                memory[mode][str(n)] = other["memory"]
                entry.setdefault("seconds_by_mode", {})[mode] = other["ready"]["seconds"]


def _load(plan: dict, parts: set[str], results: dict) -> None:
    sizes = plan["latency"]
    backends = Backends(max(sizes))
    try:
        if "latency" in parts:
            for n in sizes:
                _log(f"latency straight to the backends, {n} sessions")
                results["latency_direct"][str(n)] = run_load([f"tcp://127.0.0.1:{p}" for p in backends.ports[:n]],
                                                             duration_s=plan["duration_s"], chain=None)
        for mode in MODES:
            if "latency" not in parts and mode != "builtin":
                continue
            _log(f"proxy chain {mode} for {max(sizes)} accounts")
            chain = Chain(mode, backends.ports)
            try:
                if "latency" in parts:
                    for via, key in (("apache", mode), ("direct", f"{mode}-no-apache")):
                        for n in sizes:
                            _log(f"latency {key}, {n} sessions")
                            entry = run_load(chain.urls(n, via), duration_s=plan["duration_s"], chain=chain)
                            entry["direct_p99_ms"] = results["latency_direct"][str(n)]["p99_ms"]
                            results["latency"].setdefault(key, {})[str(n)] = entry
                if "landing" in parts and mode == "builtin":
                    _log(f"landing page, {plan['landing']} concurrent requests")
                    paths = ["", "view/s001", "novnc/core/rfb.js", "static/gateway.css", "api/desktops"]
                    results["landing"] = {
                        "accounts": max(sizes), "paths": paths,
                        "via_apache": asyncio.run(landing(chain.info["apache_url"], paths, concurrent=plan["landing"])),
                        "without_apache": asyncio.run(landing(chain.info["web_url"], paths, concurrent=plan["landing"])),
                    }
            finally:
                chain.close()
    finally:
        backends.close()
    for key, by_n in results["latency"].items():
        good = [int(n) for n, e in by_n.items() if e["p99_ms"] is not None and e["p99_ms"] < 20 and e["failed"] == 0]
        results["max_sessions_p99_under_20ms"][key] = max(good, default=0)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    (out / "latest.json").write_text(text)
    stamp = results["run"]["started"][:16].replace(":", "").replace("T", "-")
    suffix = "-quick" if results["run"]["quick"] else "-medium" if results["run"].get("medium") else ""
    (out / f"{stamp}{suffix}.json").write_text(text)
    write_report(results, out)
    _log(f"results in {out}")


if __name__ == "__main__":
    sys.exit(main())
