"""Where Apache's share of "builtin behind Apache" goes: ``python -m bench.apache_profile [N] [APACHE_DIRECTIVES]``.

The same synthetic load as the load benchmark (N sessions, 1 MB/s each, Chromium's handshake) runs
through the builtin relay straight and behind the private Apache, three times each, interleaved, and
prints the gateway's CPU-seconds per relayed GB of both and their ratio. Then one more run behind Apache
is recorded with ``perf record`` on Apache's processes, and the share of each library and the top symbols
are printed: is Apache's cost its own code (buckets, filters: something a directive could change) or the
kernel's (the extra loopback TCP hop and the thread wake-ups: something no directive removes)?

APACHE_DIRECTIVES (e.g. ``"ProxyIOBufferSize 65536"``) are appended to the generated configuration for an
A/B comparison. Needs ``perf`` (Debian linux-perf) for the profile; without it only the ratios are printed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import cmdline
from .load import Backends, Chain, Target, run_load

ROUNDS = 3
DURATION_S = 6.0


def _ratios(chain: Chain, backends: Backends, sessions: int) -> None:
    direct = Target("builtin direct", lambda n: chain.urls(n, "direct"), chain.pids)
    apache = Target("builtin behind Apache", lambda n: chain.urls(n, "apache"), chain.pids)
    for round_number in range(1, ROUNDS + 1):
        straight = run_load(direct, sessions, duration_s=DURATION_S, backends=backends)["gateway_cpu_s_per_gb"]
        behind = run_load(apache, sessions, duration_s=DURATION_S, backends=backends)["gateway_cpu_s_per_gb"]
        ratio = f"{behind / straight:.2f}x" if straight and behind else "-"
        print(f"round {round_number}: CPU-s per GB builtin direct {straight}, behind Apache {behind}: {ratio}",
              flush=True)


def _profile(chain: Chain, backends: Backends, sessions: int) -> None:
    if shutil.which("perf") is None:
        print("perf is not installed: no profile", flush=True)
        return
    apache_pids = [p for p in chain.pids() if b"apache2" in cmdline(p)]
    apache = Target("builtin behind Apache", lambda n: chain.urls(n, "apache"), chain.pids)
    with tempfile.TemporaryDirectory(prefix="bench-apache-profile-") as work:
        data = Path(work) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-o", str(data), "-p", ",".join(map(str, apache_pids))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_load(apache, sessions, duration_s=DURATION_S, backends=backends)
        perf.send_signal(signal.SIGINT)
        perf.wait()
        for sort, lines in (("dso", 8), ("sym", 20)):
            report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort,
                                     "--stdio", "-g", "none"], capture_output=True, text=True)
            rows = [line for line in report.stdout.splitlines() if line.strip() and not line.startswith("#")]
            print(f"\nApache's samples by {sort}:\n" + "\n".join(rows[:lines]), flush=True)


def main(argv: list[str]) -> int:
    sessions = int(argv[0]) if argv else 50
    extra = argv[1] if len(argv) > 1 else ""
    backends = Backends(sessions)
    chain = None
    try:
        chain = Chain("builtin", backends.ports, apache_extra=extra)
        print(f"{sessions} sessions at 1 MB/s, builtin relay" + (f", Apache with {extra!r}" if extra else ""),
              flush=True)
        _ratios(chain, backends, sessions)
        _profile(chain, backends, sessions)
    finally:
        if chain is not None:
            chain.close()
        backends.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
