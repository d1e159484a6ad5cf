"""Stragglers: a rank persistently slower than the other ranks of the node.

A rank's step time is the ``step_time`` metric of its reports when the script passes one (compute
seconds excluding waits: in a synchronous job every rank's step *interval* is the same, since the
fast ranks wait for the slow one in the collectives), else the interval between its reports.
Its score is the median of its last ``window`` step times divided by the median of the other
ranks' medians (not counting itself, so that with two ranks a 2x straggler scores 2, not 1.33);
1.0 is typical. A rank whose score stays above ``threshold`` is reported.

Defaults: ``threshold`` 1.5: NVRx flags a relative performance score under 0.75 (1.33 times
slower) but measures GPU kernel time; wall-clock step times are noisier (a fault-free run on a
loaded machine scored 1.31 over a window), so a straggler here is at least 1.5 times slower.
``window`` 20 steps: the median needs more than half of the last 20 steps to be slow, so one slow
batch or a GC pause never counts; ``patience`` 20 more steps above the threshold before the
verdict ("persistently"); ``min_ranks`` 2 (a lone rank has nobody to be compared with). The
default action is ``warn``; ``replace_node`` restarts without this node.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from stalwart.health.api import Action, Fault, FaultKind, MonitorContext
from stalwart.health.base import MonitorBase
from stalwart.worker.api import Report

__all__ = ["STEP_TIME_METRIC", "StragglerConfig", "StragglerMonitor"]

STEP_TIME_METRIC = "step_time"


@dataclass(kw_only=True, slots=True)
class StragglerConfig:
    """Straggler settings (see the module docstring for the defaults)."""

    threshold: float = 1.5
    window: int = 20
    patience: int = 20
    min_ranks: int = 2
    action: Action = Action.WARN

    def __post_init__(self) -> None:
        if self.threshold <= 1.0:
            raise ValueError(f"straggler threshold must be > 1 (a slowdown factor), got {self.threshold}")
        if self.window < 3:
            raise ValueError(f"straggler window must be >= 3 steps, got {self.window}")
        if self.patience < 0:
            raise ValueError(f"straggler patience must be >= 0 steps, got {self.patience}")
        if self.min_ranks < 2:
            raise ValueError(f"straggler min_ranks must be >= 2, got {self.min_ranks}")


@dataclass
class _Rank:
    rank: int
    local_rank: int
    last_step: int = -1
    last_time: float | None = None
    times: deque[float] = field(default_factory=deque)
    slow_since: int | None = None  # first step of the current run of scores above the threshold
    flagged: bool = False


class StragglerMonitor(MonitorBase):
    """Scores each rank's speed; emits a ``STRAGGLER`` fault when a rank turns persistently slow."""

    name = "straggler"

    def __init__(self, config: StragglerConfig | None = None) -> None:
        super().__init__()
        self.config = config or StragglerConfig()
        self._ranks: dict[int, _Rank] = {}
        self.scores: dict[int, float] = {}

    def _on_start(self, ctx: MonitorContext) -> None:
        self._ranks = {}
        self.scores = {}

    def _report(self, report: Report) -> None:
        with self._lock:
            if not self._current(report):
                return
            r = self._ranks.get(report.rank)
            if r is None:
                r = self._ranks[report.rank] = _Rank(
                    report.rank, report.local_rank, times=deque(maxlen=self.config.window)
                )
            if report.step == r.last_step:
                return  # a lower step is a counter that restarts each epoch: still a step
            step_time = report.metrics.get(STEP_TIME_METRIC)
            if step_time is None and r.last_time is not None and report.step > r.last_step:
                step_time = (report.time - r.last_time) / max(1, report.step - r.last_step)
            if step_time is not None and step_time >= 0:
                r.times.append(step_time)
            r.last_step, r.last_time = report.step, report.time

    def _check(self, now: float) -> None:
        full = [r for r in self._ranks.values() if len(r.times) >= self.config.window]
        if len(full) < self.config.min_ranks:
            return
        medians = {r.rank: statistics.median(r.times) for r in full}
        for r in full:
            others = statistics.median(v for k, v in medians.items() if k != r.rank)
            if others <= 0:
                continue
            score = medians[r.rank] / others
            self.scores[r.rank] = score
            if self.metrics is not None:
                self.metrics.straggler_score.labels(rank=str(r.rank)).set(score)
            if score <= self.config.threshold:
                r.flagged, r.slow_since = False, None
                continue
            if r.slow_since is None:
                r.slow_since = r.last_step
            if r.flagged or r.last_step - r.slow_since < self.config.patience:
                continue
            r.flagged = True
            self._emit(
                Fault(
                    kind=FaultKind.STRAGGLER,
                    action=self.config.action,
                    message=(
                        f"rank {r.rank} is a straggler: median step {medians[r.rank]:.3g}s is {score:.2f}x the "
                        f"median of the other {len(full) - 1} rank(s) ({others:.3g}s)"
                    ),
                    evidence={
                        "score": round(score, 3),
                        "threshold": self.config.threshold,
                        "rank_median_step_s": medians[r.rank],
                        "others_median_step_s": others,
                        "window": self.config.window,
                        "slow_since_step": r.slow_since,
                        "median_step_s": {str(k): round(v, 4) for k, v in medians.items()},
                        "last_step": r.last_step,
                    },
                    rank=r.rank,
                    local_rank=r.local_rank,
                    node=self._node(),
                    source=self.name,
                    observed_at=now,
                )
            )
