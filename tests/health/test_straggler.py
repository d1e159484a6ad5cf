"""Stragglers: per-rank step times against the ranks' median, from reports."""

from __future__ import annotations

import pytest

from stalwart.health.api import Action, FaultKind
from stalwart.health.straggler import StragglerConfig, StragglerMonitor
from stalwart.worker.api import Report

from .clock import Clock, context


def _feed(
    m: StragglerMonitor, step_times: dict[int, float], steps: int, start: int = 1, t0: float = 0.0
) -> None:
    for lr, dt in step_times.items():
        for i, step in enumerate(range(start, start + steps)):
            m.on_report(Report(rank=10 + lr, local_rank=lr, step=step, time=t0 + (i + 1) * dt, pid=1))


def test_a_persistently_slow_rank_is_reported_once_with_scores() -> None:
    clock = Clock()
    m = StragglerMonitor(StragglerConfig(threshold=1.3, window=10, patience=0, action=Action.REPLACE_NODE))
    m.start(context(clock, nproc=4))
    _feed(m, {0: 0.1, 1: 0.1, 2: 0.21, 3: 0.1}, steps=12)
    [f] = m.poll(clock())
    assert f.kind is FaultKind.STRAGGLER and f.action is Action.REPLACE_NODE
    assert (f.rank, f.local_rank) == (12, 2)
    assert f.evidence["score"] == pytest.approx(2.1, rel=0.01)
    assert m.poll(clock()) == []  # reported once while it stays slow
    registry = m.ctx.registry if m.ctx else None
    assert registry is not None
    assert registry.get_sample_value("stalwart_straggler_score", {"rank": "12"}) == pytest.approx(
        2.1, rel=0.01
    )
    assert registry.get_sample_value("stalwart_straggler_score", {"rank": "10"}) == pytest.approx(1.0)


def test_noise_and_a_few_slow_steps_are_not_stragglers() -> None:
    clock = Clock()
    m = StragglerMonitor(StragglerConfig(window=10))
    m.start(context(clock, nproc=2))
    for lr in (0, 1):
        t = 0.0
        for step in range(1, 30):
            t += 0.1 * (1.2 if (step + lr) % 2 else 0.9) + (1.0 if step in (5, 6, 7) and lr == 1 else 0.0)
            m.on_report(Report(rank=lr, local_rank=lr, step=step, time=t, pid=1))
    assert m.poll(clock()) == []


def test_reported_step_time_metric_wins_over_intervals() -> None:
    # A synchronous job: every rank's interval is the same; only the compute time differs.
    clock = Clock()
    m = StragglerMonitor(StragglerConfig(window=5, patience=0))
    m.start(context(clock, nproc=2))
    for step in range(1, 8):
        for lr, compute in ((0, 0.05), (1, 0.1)):
            m.on_report(
                Report(
                    rank=lr, local_rank=lr, step=step, time=step * 0.1, pid=1, metrics={"step_time": compute}
                )
            )
    [f] = m.poll(clock())
    assert f.rank == 1 and f.evidence["score"] > 1.3


def test_a_rank_must_stay_slow_for_the_patience_before_the_verdict() -> None:
    clock = Clock()
    m = StragglerMonitor(StragglerConfig(window=5, patience=10))
    m.start(context(clock, nproc=2))
    t = {0: 0.0, 1: 0.0}
    faults = []

    def step(n: int, slow: float) -> None:  # one step of both ranks, then the agent polls
        for lr, dt in ((0, 0.1), (1, slow)):
            t[lr] += dt
            m.on_report(Report(rank=10 + lr, local_rank=lr, step=n, time=t[lr], pid=1))
        faults.extend(m.poll(clock()))

    for n in range(1, 11):
        step(n, 0.3)  # slow from the first full window (step 6) on: fewer steps than the patience
    for n in range(11, 25):
        step(n, 0.1)  # it recovers (the window's median follows 3 steps later)
    assert faults == []
    for n in range(25, 45):
        step(n, 0.3)
    [f] = faults
    assert f.rank == 11 and f.evidence["slow_since_step"] >= 25
    assert f.evidence["last_step"] - f.evidence["slow_since_step"] == 10


def test_one_rank_alone_is_never_judged_and_settings_are_checked() -> None:
    clock = Clock()
    m = StragglerMonitor(StragglerConfig(window=5))
    m.start(context(clock, nproc=1))
    _feed(m, {0: 5.0}, steps=10)
    assert m.poll(clock()) == []
    with pytest.raises(ValueError, match="threshold"):
        StragglerConfig(threshold=0.9)


def test_a_real_slow_worker_is_found(node) -> None:
    m = StragglerMonitor(StragglerConfig(window=8, patience=4))
    n = node([m], nproc=3, args=["--step-time", "0.03"], fault="slow:rank=2:step=3:factor=2.5")
    f = n.wait_fault(FaultKind.STRAGGLER, timeout=30)
    assert f is not None
    assert f.rank == 2 and f.evidence["score"] > 1.5
