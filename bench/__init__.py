"""Benchmarks: how many participants one gateway host carries, and how fast a workshop comes up.

Run ``python -m bench --quick`` (a few minutes on 2 cores) or ``python -m bench`` (the full run).
Results go to ``bench/results/``: ``latest.json``, a dated copy, ``latest.md`` and PNG plots.
Every load loop is bounded in count and in time, and all traffic stays on loopback.

Load runs pin the gateway under test to one core and the load generator to the other, open
websockets as Chromium does, repeat each point (min/median/max), count lost input events, and
report every figure against references measured in the same run (a direct websocket baseline and
a minimal aiohttp pipe, bench/refpipe.py). bench/realdesk.py watches real Xvnc desktops with a
workload, straight and through each proxy mode.
"""
