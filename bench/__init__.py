"""Benchmarks: how many participants one gateway host carries, and how fast a workshop comes up.

Run ``python -m bench --quick`` (a few minutes on 2 cores) or ``python -m bench`` (the full run).
Results go to ``bench/results/``: ``latest.json``, a dated copy, ``latest.md`` and PNG plots.
Every load loop is bounded in count and in time, and all traffic stays on loopback.
"""
