"""Restart policy: backoff grows, is jittered, and gives up after too many failures in a window."""

from __future__ import annotations

import random

from gateway.model.config import RestartConfig
from gateway.model.restart import RestartPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_and_gives_up() -> None:
    clock = FakeClock()
    policy = RestartPolicy(RestartConfig(max_attempts=4, window_s=60, backoff_initial_s=1, backoff_max_s=3),
                           clock=clock, rng=random.Random(1))
    delays = [policy.next_delay() for _ in range(4)]
    assert all(d is not None for d in delays)
    assert 0.5 <= delays[0] <= 1 and 1 <= delays[1] <= 2 and 1.5 <= delays[2] <= 3 and 1.5 <= delays[3] <= 3
    assert policy.next_delay() is None  # fifth failure within the window: give up


def test_failures_outside_the_window_are_forgotten() -> None:
    clock = FakeClock()
    policy = RestartPolicy(RestartConfig(max_attempts=2, window_s=10), clock=clock)
    assert policy.next_delay() is not None
    assert policy.next_delay() is not None
    clock.now = 11
    assert policy.restarts == 0
    assert policy.next_delay() is not None


def test_healthy_run_resets_the_backoff() -> None:
    policy = RestartPolicy(RestartConfig(max_attempts=10, backoff_initial_s=1, backoff_max_s=100),
                           clock=FakeClock(), rng=random.Random(2))
    for _ in range(5):
        policy.next_delay()
    policy.record_healthy()
    delay = policy.next_delay()
    assert delay is not None and delay <= 1
