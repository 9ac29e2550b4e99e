"""The Markdown table and the PNG plots made from a results dict."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_report"]


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}{unit}"
    return f"{value}{unit}"


def write_report(results: dict, out: Path) -> None:
    (out / "latest.md").write_text(markdown(results))
    try:
        plots(results, out)
    except ImportError:
        print("[bench] matplotlib is not installed (pip install -e '.[bench]'): no plots", flush=True)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Benchmark results ({'quick' if r['run']['quick'] else 'medium' if r['run'].get('medium') else 'full'} run, {r['run']['started']})",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, {m['os']}, kernel {m['kernel']}, "
        f"Python {m['python']}, {m['apache']}, {m['xvnc']}. Load average at start: "
        f"{', '.join(map(str, m['load_average_at_start']))}. The run took {r['run'].get('seconds', '?')} s.",
        "",
    ]
    if r["ready"]:
        lines += ["## Time to ready (real `gateway up`, local Xvnc desktops, RFB handshake through Apache)", "",
                  "| desktops | all ready | per desktop p50 | p99 | start_concurrency 1 |", "|---|---|---|---|---|"]
        for n, e in sorted(r["ready"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {n} | {_fmt(e.get('seconds'), ' s')} | {_fmt(e.get('desktop_p50_s'), ' s')} | "
                         f"{_fmt(e.get('desktop_p99_s'), ' s')} | {_fmt(e.get('serial_seconds'), ' s')} |")
        lines.append("")
    if any(r["memory"].values()):
        lines += ["## Gateway memory (PSS of supervisor, proxies and Apache; desktops excluded)", "",
                  "| mode | accounts | idle MB per account | connected MB per account | idle total MB | connected total MB |",
                  "|---|---|---|---|---|---|"]
        for mode, by_n in r["memory"].items():
            for n, e in sorted(by_n.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {mode} | {n} | {e['idle_mb_per_account']} | {e['connected_mb_per_account']} | "
                             f"{e['idle_total_mb']['total']} | {e['connected_total_mb']['total']} |")
        lines.append("")
    if r["latency"]:
        lines += ["## Input round trip under load (1 MB/s per session, an input event every 50 ms)", "",
                  "| chain | sessions | p50 ms | p99 ms | straight to backends p99 ms | p99 added ms | gateway CPU s | failed |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, by_n in r["latency"].items():
            for n, e in sorted(by_n.items(), key=lambda kv: int(kv[0])):
                added = (round(e["p99_ms"] - e["direct_p99_ms"], 2)
                         if e["p99_ms"] is not None and e["direct_p99_ms"] is not None else None)
                lines.append(f"| {mode} | {n} | {_fmt(e['p50_ms'])} | {_fmt(e['p99_ms'])} | {_fmt(e['direct_p99_ms'])} | "
                             f"{_fmt(added)} | {_fmt(e.get('gateway_cpu_s'))} | {e['failed']} |")
        loads = [e["load_average_1m"] for by_n in r["latency"].values() for e in by_n.values() if "load_average_1m" in e]
        if loads:
            lines += ["", f"1-minute load average during these runs: {min(loads):g} to {max(loads):g} "
                      f"(on {m['cpus']} CPUs; above {m['cpus']} means other work competed for the CPUs)."]
        lines += ["", "Largest tested session count with p99 under 20 ms and no failed connects: "
                  + ", ".join(f"{k} {v}" for k, v in r["max_sessions_p99_under_20ms"].items()), ""]
    if r["landing"]:
        lines += [f"## Landing page and static files: {r['landing']['via_apache']['requests']} concurrent requests", "",
                  "| front | p50 ms | p99 ms | errors |", "|---|---|---|---|"]
        for key in ("via_apache", "without_apache"):
            e = r["landing"][key]
            lines.append(f"| {key.replace('_', ' ')} | {_fmt(e['p50_ms'])} | {_fmt(e['p99_ms'])} | {e['errors']} |")
        lines.append("")
    return "\n".join(lines)


def plots(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if r["latency"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode, by_n in r["latency"].items():
            points = sorted((int(n), e["p99_ms"]) for n, e in by_n.items() if e["p99_ms"] is not None)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linestyle="--" if mode.endswith("no-apache") else "-", label=mode)
        direct = sorted((int(n), e["p99_ms"]) for n, e in r["latency_direct"].items() if e["p99_ms"] is not None)
        ax.plot([p[0] for p in direct], [p[1] for p in direct], marker="x", color="black", label="straight to backends")
        ax.axhline(20, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions (1 MB/s each)")
        ax.set_ylabel("p99 input round trip (ms)")
        ax.legend(fontsize=8)
        ax.set_title("Input latency under load")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
    if any(r["memory"].values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        labels, idle, connected = [], [], []
        for mode, by_n in r["memory"].items():
            for n, e in sorted(by_n.items(), key=lambda kv: int(kv[0])):
                labels.append(f"{mode}\n{n} accounts")
                idle.append(e["idle_mb_per_account"])
                connected.append(e["connected_mb_per_account"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], idle, width=0.4, label="idle")
        ax.bar([x + 0.2 for x in xs], connected, width=0.4, label="every account connected")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("gateway PSS per account (MB)")
        ax.legend()
        ax.set_title("Gateway memory per account")
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=100)
        plt.close(fig)
    if r["ready"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        points = sorted((int(n), e.get("seconds"), e.get("serial_seconds")) for n, e in r["ready"].items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="parallel start (default 8)")
        serial = [p for p in points if p[2] is not None]
        ax.plot([p[0] for p in serial], [p[2] for p in serial], marker="s", label="start_concurrency 1")
        ax.set_xlabel("desktops")
        ax.set_ylabel("seconds until every desktop answers through Apache")
        ax.legend()
        ax.set_title("Time to ready")
        fig.tight_layout()
        fig.savefig(out / "ready.png", dpi=100)
        plt.close(fig)
