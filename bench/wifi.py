"""Typing echo and update rate of the real viewer on bad Wi-Fi: ``python -m bench.wifi`` (also a part of
``python -m bench``, ``--only wifi``).

One local desktop (a real `gateway up`) runs the workload of bench/realdesk.py: an xterm printing the
time every 50 ms and moved about, and a small "probe" xterm running ``cat`` with the keyboard focus.
Debian's Chromium, in a network namespace of its own (tests/netem.py), opens the viewer page and
connects as a participant does. In the page, every ``KEY_EVERY_S`` a key is sent through noVNC and
the time until the probe window's pixels change on the canvas is taken (the typing echo: key to
pixels, as the participant sees it; a key with no change within ``KEY_LOST_S`` counts as that long);
the update rate is counted twice: framebuffer updates completed by noVNC (TigerVNC pushes continuous
updates, so their number depends on how the server splits them), and screen changes, the animation
frames in which the printing xterm's part of the canvas changed (what the participant sees; the xterm
prints every 50 ms and is moved every second).

Each link is measured in turn, the same desktop and workload:

* ``clean``: the namespace's veth pair and a relay that only forwards;
* ``wifi``: 2 Mbit/s each way (tbf in the kernel: real), 100 ms added each way and 1% of 1448-byte
  segments lost (approximated by the relay in user space: a lost segment stalls its direction for
  one round trip, as TCP's fast retransmit does; the kernel has no netem).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.netem import ImpairedRelay, Link, namespace_link
from tests.system import chromium_browser

from .common import latency_with_losses, spread
from .desktops import GatewayUp
from .realdesk import PROBE_MARGIN, start_workload

__all__ = ["LINKS", "measure_wifi"]

KEY_EVERY_S = 0.5
KEY_LOST_S = 3.0
VIEWPORT = {"width": 1366, "height": 768}
#: The links measured: tc rate (None: unshaped), delay added each way, segment loss.
LINKS = {
    "clean": {"rate": None, "delay_s": 0.0, "loss": 0.0},
    "wifi": {"rate": "2mbit", "delay_s": 0.1, "loss": 0.01},
}
#: Display settings as a participant would keep them: 1:1 (no resize), so the probe stays where it is;
#: quality and compression are the event's defaults.
SETTINGS_JS = "localStorage.setItem('gateway.viewer.settings.v1', JSON.stringify({scaling: 'none'}))"
#: Runs in the page once connected: counts noVNC's completed framebuffer updates (noVNC's own
#: _framebufferUpdate returns true when one is complete; the same in noVNC 1.3 and 1.7) and offers
#: measureKey(), the time from a key to the first change of the probe's pixels.
MEASURE_JS = """([x, y, w, h, lostMs]) => {
  const rfb = window.gatewayViewer.rfb;
  window.benchUpdates = 0;
  const original = rfb._framebufferUpdate.bind(rfb);
  rfb._framebufferUpdate = () => { const done = original(); if (done) window.benchUpdates += 1; return done; };
  const canvas = document.querySelector('#screen canvas');
  const context = canvas.getContext('2d');
  const region = () => context.getImageData(x, y, w, h).data;
  // How often the participant sees the printing xterm change: animation frames in which its band
  // (top left, where it prints and moves) differs from the frame before, sampled every 4th pixel.
  window.benchChanges = 0;
  let last = null;
  const band = () => context.getImageData(0, 0, Math.min(canvas.width, 736), Math.min(canvas.height, 296)).data;
  const watch = () => {
    const now = band();
    if (last) {
      for (let i = 0; i < now.length; i += 16) {
        if (now[i] !== last[i] || now[i + 1] !== last[i + 1]) { window.benchChanges += 1; break; }
      }
    }
    last = now;
    requestAnimationFrame(watch);
  };
  requestAnimationFrame(watch);
  let next = 0x61;
  window.measureKey = () => new Promise((resolve) => {
    const before = region();
    const keysym = next; next = next === 0x7a ? 0x61 : next + 1;   // a, b, ... z: every key changes the probe
    const sent = performance.now();
    rfb.sendKey(keysym, null);
    const look = () => {
      const now = region();
      for (let i = 0; i < now.length; i += 4) {
        if (now[i] !== before[i] || now[i + 1] !== before[i + 1] || now[i + 2] !== before[i + 2]) {
          resolve(performance.now() - sent); return;
        }
      }
      if (performance.now() - sent > lostMs) { resolve(null); return; }
      requestAnimationFrame(look);
    };
    requestAnimationFrame(look);
  });
}"""


def _log(message: str) -> None:
    print(f"[bench.wifi] {message}", file=sys.stderr, flush=True)


def _measure_link(browser, link: Link, relay: ImpairedRelay, run: GatewayUp,  # type: ignore[no-untyped-def]
                  probe: tuple[int, int, int, int], duration_s: float) -> dict[str, object]:
    account = run.accounts[0]
    context = browser.new_context(viewport=VIEWPORT)
    try:
        context.add_init_script(SETTINGS_JS)
        page = context.new_page()
        page.goto(f"http://{link.host_address}:{relay.port}/view/{account.id}", timeout=60_000)
        page.fill("#password", account.password)
        page.press("#password", "Enter")
        page.wait_for_selector("#status[data-state=connected]", state="attached", timeout=60_000)
        page.wait_for_function("document.querySelector('#screen canvas') && "
                               "document.querySelector('#screen canvas').width > 0", timeout=30_000)
        time.sleep(2)  # the first whole-screen update has arrived and drawn
        # xdotool's geometry of a decorated window is off by its title bar: a margin (nothing else draws there).
        x, y, w, h = probe
        x, y = max(0, x - PROBE_MARGIN), max(0, y - PROBE_MARGIN)
        page.evaluate(MEASURE_JS, [x, y, w + 2 * PROBE_MARGIN, h + 2 * PROBE_MARGIN, KEY_LOST_S * 1000])
        rtts: list[float] = []
        lost = 0
        started = time.monotonic()
        updates_before, changes_before = page.evaluate("[window.benchUpdates, window.benchChanges]")
        while time.monotonic() - started < duration_s:
            ms = page.evaluate("window.measureKey()")
            if ms is None:
                lost += 1
            else:
                rtts.append(ms)
            time.sleep(KEY_EVERY_S)
        elapsed = time.monotonic() - started
        updates, changes = page.evaluate("[window.benchUpdates, window.benchChanges]")
        keys = latency_with_losses(rtts, lost, KEY_LOST_S)
        return {"key_p50_ms": keys["p50_ms"], "key_p99_ms": keys["p99_ms"], "keys": len(rtts) + lost,
                "keys_lost": lost, "updates_per_s": round((updates - updates_before) / elapsed, 1),
                "screen_changes_per_s": round((changes - changes_before) / elapsed, 1),
                "reconnects": page.evaluate("(window.gatewayViewer.connects || 1) - 1")}
    finally:
        context.close()


def measure_wifi(*, rounds: int = 2, duration_s: float = 20.0, mode: str = "per-account",
                 timeout_s: float = 120) -> dict[str, object]:
    """``rounds`` times each link of LINKS, one after the other, against one real desktop."""
    run = GatewayUp(1, mode)
    workload: list[subprocess.Popen[bytes]] = []
    try:
        ready = asyncio.run(run.start_and_wait_ready(timeout_s))
        if ready["seconds"] is None:
            raise RuntimeError(f"the desktop was not ready within {timeout_s} s")
        workload, probe = start_workload(run, 0)
        time.sleep(1)
        out: dict[str, list[dict[str, object]]] = {name: [] for name in LINKS}
        with namespace_link() as link, tempfile.TemporaryDirectory(prefix="bench-wifi-") as scratch, \
                chromium_browser(lambda chromium: link.chromium_wrapper(Path(scratch), chromium)) as browser:
            for _ in range(rounds):
                for name, spec in LINKS.items():
                    _log(f"{name}: {spec}")
                    link.shape(spec["rate"])  # type: ignore[arg-type]
                    delay = float(spec["delay_s"])  # type: ignore[arg-type]
                    with ImpairedRelay(link.host_address, ("127.0.0.1", run.port), delay_s=delay,
                                       loss=float(spec["loss"]), stall_s=2 * delay + 0.02) as relay:  # type: ignore[arg-type]
                        out[name].append(_measure_link(browser, link, relay, run, probe, duration_s))
        keys = ("key_p50_ms", "key_p99_ms", "keys_lost", "updates_per_s", "screen_changes_per_s", "reconnects")
        return {"mode": mode, "links": LINKS, "rounds": out,
                "summary": {name: {k: spread([r.get(k) for r in runs]) for k in keys}  # type: ignore[misc]
                            for name, runs in out.items()}}
    finally:
        for proc in workload:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        run.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wifi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of typing per link and round")
    parser.add_argument("--mode", default="per-account", choices=("per-account", "shared", "builtin"))
    args = parser.parse_args(argv)
    result = measure_wifi(rounds=args.rounds, duration_s=args.duration, mode=args.mode)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
