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
        f"{', '.join(map(str, m['load_average_at_start']))}, at the end: "
        f"{', '.join(map(str, r['run'].get('load_average_at_end', [])))}. The run took {r['run'].get('seconds', '?')} s.",
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
    if r.get("restart"):
        lines += ["Per-account proxy killed with SIGKILL, seconds until an RFB handshake through Apache works again: "
                  + "; ".join(f"{n} desktops: {', '.join(map(_fmt, e.get('per-account proxy killed, back after s') or []))}"
                              for n, e in sorted(r["restart"].items(), key=lambda kv: int(kv[0]))), ""]
    if r.get("load_summary"):
        lines += load_tables(r)
    if r.get("real"):
        lines += real_tables(r)
    if r["landing"]:
        lines += [f"## Landing page and static files: {r['landing']['via_apache']['requests']} concurrent requests", "",
                  "| front | p50 ms | p99 ms | errors |", "|---|---|---|---|"]
        for key in ("via_apache", "without_apache"):
            e = r["landing"][key]
            lines.append(f"| {key.replace('_', ' ')} | {_fmt(e['p50_ms'])} | {_fmt(e['p99_ms'])} | {e['errors']} |")
        lines.append("")
    return "\n".join(lines)


def _spread(point: dict, key: str, unit: str = "") -> str:
    e = point.get(key)
    if not e or e.get("median") is None:
        return "-"
    if e["min"] == e["max"]:
        return f"{e['median']:g}{unit}"
    return f"{e['median']:g}{unit} ({e['min']:g}-{e['max']:g})"


def load_tables(r: dict) -> list[str]:
    m, cores = r["machine"], r.get("cores", {})
    plan = r["run"]["plan"]
    lines = [
        "## Synthetic load: 1 MB/s per session, an input event every 50 ms", "",
        f"Gateway under test pinned to CPU {cores.get('gateway')}, load generator (clients and backends) to CPU "
        f"{cores.get('load_generator')}. Each point ran {plan.get('repeats')} times for {plan.get('duration_s')} s; "
        "figures are median (min-max). Clients open websockets as Chromium does (`binary`, "
        "`permessage-deflate; client_max_window_bits`); \"negotiated\" is what each chain accepted. "
        "A lost event (not echoed by the end of the run) counts as a round trip of the run's length. "
        "\"p99 added\" is against the direct websocket baseline of the same round (no proxy at all); CPU per GB is "
        "the gateway's CPU (its whole process tree, Apache included) per GB delivered to the clients, and its ratio "
        "is against the reference pipe (a few dozen lines of aiohttp, same core) of the same round.", "",
    ]
    for n in sorted({int(n) for by_n in r["load_summary"].values() for n in by_n}):
        lines += [f"### {n} sessions", "",
                  "| chain | p99 ms | p99 added ms | lost events | failed | received MB/s | gateway CPU-s | "
                  "CPU-s per GB | vs reference pipe | vs builtin direct | load generator CPU-s | negotiated |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, by_n in r["load_summary"].items():
            point = by_n.get(str(n))
            if point is None:
                continue
            lines.append(f"| {name} | {_spread(point, 'p99_ms')} | {_spread(point, 'p99_added_ms')} | "
                         f"{_spread(point, 'lost_events')} | {_spread(point, 'failed')} | "
                         f"{_spread(point, 'received_mb_per_s')} | {_spread(point, 'gateway_cpu_s')} | "
                         f"{_spread(point, 'gateway_cpu_s_per_gb')} | {_spread(point, 'cpu_per_gb_vs_reference', 'x')} | "
                         f"{_spread(point, 'cpu_per_gb_vs_builtin_direct', 'x')} | {_spread(point, 'load_cpu_s')} | "
                         f"{', '.join(point.get('negotiated', [])) or '-'} |")
        lines.append("")
    loads = [e["load_average_1m"] for by_n in r["load"].values() for runs in by_n.values() for e in runs]
    if loads:
        lines += [f"1-minute load average during these runs: {min(loads):g} to {max(loads):g} on {m['cpus']} CPUs "
                  "(the gateway and the load generator account for up to 2 of it; more means other work competed).", ""]
    lines += ["Largest session count whose p99 added stayed at or under 20 ms in every round, with no lost event and "
              "no failed connect: " + ", ".join(f"{k} {v}" for k, v in r["max_sessions_p99_added_under_20ms"].items()),
              ""]
    return lines


def real_tables(r: dict) -> list[str]:
    plan = r["run"]["plan"]
    first = next(iter(next(iter(r["real"].values())).values()))
    workload = first.get("workload", {"print_every_s": 0.05, "move_every_s": 1.0})  # older runs: the Wi-Fi workload
    lines = [f"## Real desktops (Xvnc, openbox, an xterm printing every {workload['print_every_s'] * 1000:g} ms moved "
             f"by xdotool every {workload['move_every_s']:g} s, a key typed every 0.5 s)",
             "",
             f"In each round every desktop has one client: for half of the desktops it connects straight (TCP to "
             f"Xvnc), for the other half through the gateway (websocket via Apache, Chromium's handshake), all at "
             f"the same time; the halves swap every round. {plan.get('real_rounds')} rounds of {plan.get('real_duration_s')} s, "
             "measured after every connection's first whole-screen update; median (min-max). Key-to-pixel: from the "
             "key event to the first update touching the probe window; a key without one within 2 s is lost and "
             "counts as 2 s. \"added\" is against the straight figure of the same round. The desktops, their "
             "workload and the clients share the load generator's core.", "",
             "| desktops | mode | path | key p50 ms | key p99 ms | key p99 added ms | keys lost | KB/s per desktop | "
             "updates/s per desktop | gateway CPU-s per GB | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios, cpus = [], []
    for n, by_mode in sorted(r["real"].items(), key=lambda kv: int(kv[0])):
        for mode, result in by_mode.items():
            for via, point in result["summary"].items():
                lines.append(f"| {n} | {mode} | {'straight' if via == 'direct' else 'gateway'} | "
                             f"{_spread(point, 'key_p50_ms')} | {_spread(point, 'key_p99_ms')} | "
                             f"{_spread(point, 'key_p99_added_ms')} | {_spread(point, 'keys_lost')} | "
                             f"{_spread(point, 'kb_per_s_per_desktop')} | {_spread(point, 'updates_per_s_per_desktop')} | "
                             f"{_spread(point, 'gateway_cpu_s_per_gb')} | {_spread(point, 'failed')} |")
            ratios.append(result["deflate"]["ratio"].get("median"))
            cpus.append(result["deflate"]["cpu_ms_per_mb"].get("median"))
    known = [(a, b) for a, b in zip(ratios, cpus) if a is not None and b is not None]
    if known:
        lines += ["", f"permessage-deflate on this real update stream (zlib level 1 per update, context kept, as aiohttp "
                  f"does it): {min(a for a, _ in known):g} to {max(a for a, _ in known):g} of the bytes remain, for "
                  f"{min(b for _, b in known):g} to {max(b for _, b in known):g} CPU-ms per MB deflated."]
    lines.append("")
    return lines


def plots(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if r.get("load_summary"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, by_n in r["load_summary"].items():
            points = sorted((int(n), e["p99_ms"]) for n, e in by_n.items() if e.get("p99_ms", {}).get("median"))
            if not points:
                continue
            xs = [p[0] for p in points]
            med = [p[1]["median"] for p in points]
            err = [[p[1]["median"] - p[1]["min"] for p in points], [p[1]["max"] - p[1]["median"] for p in points]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=name,
                        linestyle=":" if name == "direct websocket baseline" else "-")
        ax.axhline(20, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions (1 MB/s each)")
        ax.set_ylabel("p99 input round trip, lost events included (ms)")
        ax.legend(fontsize=8)
        ax.set_title("Input latency under load (median, min-max of the rounds)")
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
