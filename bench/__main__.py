"""``python -m bench [--quick]``: run every measurement and write bench/results/."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .common import machine, spread
from .desktops import measure_gateway
from .load import GATEWAY_CPUS, LOAD_CPUS, Backends, Chain, RefPipe, Target, landing, run_load
from .realdesk import measure_real_desktops
from .report import write_report
from .wifi import measure_wifi

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("per-account", "shared", "builtin")

PLANS = {
    "quick": {"real": [3], "real_rounds": 3, "real_duration_s": 4.0, "ready": [10], "serial": [], "memory": [10], "latency": [50], "repeats": 3, "duration_s": 4.0,
              "ready_timeout_s": 120, "landing": 500,
              "wifi_rounds": 1, "wifi_duration_s": 10.0},
    # What a 2-core machine measures in about a quarter of an hour: the 60-desktop and
    # 150-session targets, each load point three times.
    "medium": {"real": [20, 60], "real_rounds": 3, "real_duration_s": 8.0, "ready": [10, 60], "serial": [], "memory": [60], "latency": [50, 100, 150, 200], "repeats": 3,
               "duration_s": 8.0, "ready_timeout_s": 600, "landing": 500, "wifi_rounds": 2, "wifi_duration_s": 20.0},
    "full": {"real": [20, 60], "real_rounds": 5, "real_duration_s": 15.0, "ready": [10, 60, 200], "serial": [10, 60], "memory": [60, 200], "latency": [50, 100, 150, 200, 300],
             "repeats": 5, "duration_s": 15.0, "ready_timeout_s": 900, "landing": 500, "wifi_rounds": 3,
             "wifi_duration_s": 20.0},
}
#: The chains of the load benchmark, each against the reference pipe and the direct baseline.
CHAINS = ("reference pipe", "builtin direct", "builtin behind Apache", "per-account behind Apache",
          "shared behind Apache")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, short loads: a few minutes on 2 cores")
    parser.add_argument("--medium", action="store_true",
                        help="60 desktops and up to 300 sessions: about ten minutes on 2 cores")
    parser.add_argument("--only", choices=("ready", "memory", "latency", "landing", "real", "wifi"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    for program in ("Xvnc", "apache2"):
        if shutil.which(program) is None:
            print(f"{program} is not installed; run scripts/setup first", file=sys.stderr)
            return 2
    plan = PLANS["quick" if args.quick else "medium" if args.medium else "full"]
    parts = set(args.only or ("ready", "memory", "latency", "landing", "real", "wifi"))
    started = time.monotonic()
    results: dict[str, object] = {
        "machine": machine(),
        "run": {"quick": args.quick, "medium": args.medium, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "plan": plan},
        "cores": {"gateway": GATEWAY_CPUS, "load_generator": LOAD_CPUS},
        "ready": {}, "memory": {m: {} for m in MODES}, "restart": {}, "load": {}, "load_summary": {},
        "max_sessions_p99_added_under_20ms": {}, "landing": {}, "real": {}, "wifi": {},
    }
    try:
        if parts & {"ready", "memory"}:
            asyncio.run(_desktops(plan, parts, results))
        if parts & {"latency", "landing"}:
            _load(plan, parts, results)
        if "real" in parts:
            asyncio.run(_real(plan, results))
        if "wifi" in parts:  # Playwright's sync API: outside any event loop
            _log("the viewer on a clean link and on bad Wi-Fi (2 Mbit/s, 100 ms each way, 1% loss)")
            results["wifi"] = measure_wifi(rounds=plan["wifi_rounds"], duration_s=plan["wifi_duration_s"],
                                           timeout_s=plan["ready_timeout_s"])
    except Exception as exc:
        # A part that fails late (e.g. xdotool timing out on a saturated machine) must not throw away
        # the parts measured before it: they are written, marked incomplete.
        results["run"]["incomplete"] = f"{type(exc).__name__}: {exc}"  # type: ignore[index]
        _log(f"stopped early: {exc}; writing what was measured")
    finally:
        results["run"]["seconds"] = round(time.monotonic() - started, 1)  # type: ignore[index]
        results["run"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # type: ignore[index]
        write_results(results, args.out)
    return 1 if results["run"].get("incomplete") else 0  # type: ignore[union-attr]


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def _desktops(plan: dict, parts: set[str], results: dict) -> None:
    ready, memory = results["ready"], results["memory"]
    sizes = sorted(set(plan["ready"] if "ready" in parts else []) | set(plan["memory"] if "memory" in parts else []))
    for n in sizes:
        want_memory = "memory" in parts and n in plan["memory"]
        _log(f"gateway up, {n} desktops, per-account")
        result = await measure_gateway(n, "per-account", memory=want_memory, timeout_s=plan["ready_timeout_s"],
                                       restarts=3)
        entry = ready.setdefault(str(n), {})
        entry.update(seconds=result["ready"]["seconds"], desktop_p50_s=result["ready"]["desktop_p50_s"],
                     desktop_p99_s=result["ready"]["desktop_p99_s"])
        results["restart"][str(n)] = {"per-account proxy killed, back after s": result.get("restart_s")}
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


async def _real(plan: dict, results: dict) -> None:
    for n in plan["real"]:
        for mode in MODES:
            _log(f"real desktops with a workload: {n}, straight and through {mode}")
            results["real"].setdefault(str(n), {})[mode] = await measure_real_desktops(
                n, mode, rounds=plan["real_rounds"], duration_s=plan["real_duration_s"],
                timeout_s=plan["ready_timeout_s"])


def _load(plan: dict, parts: set[str], results: dict) -> None:
    sizes = plan["latency"]
    backends = Backends(max(sizes))
    chains: list[Chain] = []
    refpipe = None
    try:
        refpipe = RefPipe(backends.ports)
        for mode in MODES:
            _log(f"proxy chain {mode} for {max(sizes)} accounts")
            chains.append(Chain(mode, backends.ports))
        per_account, shared, builtin = chains
        targets = [
            Target("reference pipe", refpipe.urls, refpipe.pids),
            Target("builtin direct", lambda n: builtin.urls(n, "direct"), builtin.pids),
            Target("builtin behind Apache", lambda n: builtin.urls(n, "apache"), builtin.pids),
            Target("per-account behind Apache", lambda n: per_account.urls(n, "apache"), per_account.pids),
            Target("shared behind Apache", lambda n: shared.urls(n, "apache"), shared.pids),
        ]
        baseline = Target("direct websocket baseline", backends.direct_urls, None)
        if "latency" in parts:
            for n in sizes:
                _load_point(n, plan, targets, baseline, backends, results["load"])
        if "landing" in parts:
            _log(f"landing page, {plan['landing']} concurrent requests")
            paths = ["", "view/s001", "novnc/core/rfb.js", "static/gateway.css", "api/desktops"]
            results["landing"] = {
                "accounts": max(sizes), "paths": paths,
                "via_apache": asyncio.run(landing(builtin.info["apache_url"], paths, concurrent=plan["landing"])),
                "without_apache": asyncio.run(landing(builtin.info["web_url"], paths, concurrent=plan["landing"])),
            }
    finally:
        for chain in chains:
            chain.close()
        if refpipe is not None:
            refpipe.close()
        backends.close()
    results["load_summary"] = summarize_load(results["load"])
    for name, by_n in results["load_summary"].items():
        if name == "direct websocket baseline":
            continue
        good = [int(n) for n, e in by_n.items()
                if e.get("p99_added_ms", {}).get("max") is not None and e["p99_added_ms"]["max"] <= 20
                and e["failed"]["max"] == 0 and e["lost_events"]["max"] == 0]
        results["max_sessions_p99_added_under_20ms"][name] = max(good, default=0)


def _load_point(n: int, plan: dict, targets: list[Target], baseline: Target, backends: Backends,
                out: dict) -> None:
    """``repeats`` rounds at N sessions: the baseline, then every chain (in a rotated order)."""
    for rep in range(plan["repeats"]):
        _log(f"{n} sessions, round {rep + 1}/{plan['repeats']}: {baseline.name}")
        base = run_load(baseline, n, duration_s=plan["duration_s"], backends=backends)
        out.setdefault(baseline.name, {}).setdefault(str(n), []).append(base)
        runs = {}
        order = targets[rep % len(targets):] + targets[:rep % len(targets)]
        for target in order:
            _log(f"{n} sessions, round {rep + 1}/{plan['repeats']}: {target.name}")
            entry = run_load(target, n, duration_s=plan["duration_s"], backends=backends)
            entry["round"] = rep
            if entry["p99_ms"] is not None and base["p99_ms"] is not None:
                entry["p99_added_ms"] = round(entry["p99_ms"] - base["p99_ms"], 2)
            runs[target.name] = entry
            out.setdefault(target.name, {}).setdefault(str(n), []).append(entry)
        _ratios(runs)


def _ratios(runs: dict[str, dict]) -> None:
    """CPU per GB against the references of the same round."""
    def per_gb(name: str) -> float | None:
        return runs.get(name, {}).get("gateway_cpu_s_per_gb")

    reference, builtin_direct = per_gb("reference pipe"), per_gb("builtin direct")
    for name, entry in runs.items():
        mine = entry.get("gateway_cpu_s_per_gb")
        if mine and reference:
            entry["cpu_per_gb_vs_reference"] = round(mine / reference, 2)
        if mine and builtin_direct:
            entry["cpu_per_gb_vs_builtin_direct"] = round(mine / builtin_direct, 2)


SPREAD_KEYS = ("p50_ms", "p99_ms", "p99_added_ms", "p99_echoed_ms", "lost_events", "failed", "received_mb_per_s",
               "gateway_cpu_s", "gateway_cpu_s_per_gb", "cpu_per_gb_vs_reference", "cpu_per_gb_vs_builtin_direct",
               "load_cpu_s", "gateway_pss_mb", "load_average_1m")


def summarize_load(load: dict) -> dict:
    """min/median/max over the repetitions of every (chain, sessions) point."""
    summary: dict[str, dict] = {}
    for name, by_n in load.items():
        for n, runs in by_n.items():
            point = {key: spread([r.get(key) for r in runs]) for key in SPREAD_KEYS if any(key in r for r in runs)}
            point["negotiated"] = sorted({v for r in runs for v in r.get("negotiated", [])})
            summary.setdefault(name, {})[n] = point
    return summary


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
