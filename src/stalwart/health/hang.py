"""Hang detection: a rank that stops making progress for longer than its learned timeout.

Each rank's step interval is learned from its reports; a rank is hung when it has not reported
for ``max(factor x typical interval, 1.5 x longest recent interval, floor)``, where the typical
interval is the larger of the median over ``window`` (50) intervals and the median of the last
``recent`` (5), so that a job that slows down (a straggler, a longer sequence length) is judged by
its new pace within a few steps. Defaults:

- ``factor`` 3: a synchronous job's step time varies by tens of percent (data loading, GC,
  logging); three medians leave room for that and still catch a hang within a few steps.
- ``1.5 x`` the longest of the last ``window`` intervals: periodic slow steps (evaluation, a
  blocking checkpoint every N steps) are learned once seen and stop counting as hangs.
- ``floor`` 1 s: the target is a verdict within three step times plus one second; below a
  second a pause (GC, a slow batch) cannot be told from a hang. Known long phases are announced
  with ``busy()`` and interpreter shutdown with an exit notice (below), so they never count.
- ``startup_timeout`` 600 s until a rank has sent ``warmup`` + 1 reports in this generation and
  ``min_intervals`` intervals are learned: the first steps include imports, compilation and
  checkpoint loading. Those first ``warmup`` (2) intervals of each generation are not learned,
  so that a slow first step does not inflate the longest-interval term; learned intervals carry
  over to the next generation, so a restarted job is watched closely from its fourth step.
- A hang declared again at the same step after a restart multiplies that rank's timeout by
  ``repeat_backoff`` (4): a step that is deterministically slow must not cause a restart loop.

A worker may announce a long phase with ``stalwart.worker.busy(seconds)`` (a blocking checkpoint,
an evaluation, the final save); its timeout then covers that phase. A worker whose interpreter is
shutting down normally (``report`` sends a notice from ``atexit``) is never judged: torch and
NCCL teardown can take seconds after the last step.

Without reports the monitor falls back to log silence: no output line from any local rank for
``log_silence`` seconds (300 s by default; 0 disables). A worker stopped by SIGSTOP (state ``T``)
for ``stopped_grace`` seconds is a hang at once. Before the fault is emitted every worker is asked
for its stacks (and NCCL's flight recorder for its trace); see ``stalwart.health.stacks``.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from stalwart.health.api import Action, Fault, FaultKind, MonitorContext
from stalwart.health.base import MonitorBase
from stalwart.health.stacks import StackDump, proc_state
from stalwart.worker.api import METRIC_BUSY, METRIC_EXITING, Report

__all__ = ["HangConfig", "HangMonitor"]


@dataclass(kw_only=True, slots=True)
class HangConfig:
    """Hang-detection settings (see the module docstring for why the defaults are what they are)."""

    factor: float = 3.0
    floor: float = 1.0
    window: int = 50
    min_intervals: int = 3
    warmup: int = 2
    recent: int = 5
    startup_timeout: float = 600.0
    log_silence: float = 300.0
    stopped_grace: float = 1.0
    dump_timeout: float = 2.0
    repeat_backoff: float = 4.0
    action: Action = Action.RESTART

    def __post_init__(self) -> None:
        for name in ("factor", "floor", "startup_timeout", "stopped_grace", "dump_timeout", "repeat_backoff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hang {name} must be > 0, got {getattr(self, name)}")
        if self.log_silence < 0:
            raise ValueError(f"hang log_silence must be >= 0 (0 disables), got {self.log_silence}")
        if (
            self.window < 2
            or not 1 <= self.min_intervals <= self.window
            or self.warmup < 0
            or self.recent < 1
        ):
            raise ValueError(
                "hang window must be >= 2, 1 <= min_intervals <= window, warmup >= 0, recent >= 1"
            )


class _Phase(StrEnum):
    WATCHING = "watching"
    DUMPING = "dumping"  # stacks requested; the fault goes out when they are written or at the deadline
    FIRED = "fired"  # one hang per generation: the agent restarts the workers


@dataclass
class _Rank:
    rank: int
    local_rank: int
    last_step: int = -1
    last_time: float = 0.0
    reports: int = 0
    intervals: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    busy_until: float = 0.0  # stalwart.worker.busy(): no hang before this time
    busy_at: float = 0.0  # when the last busy() notice came
    exiting: bool = False  # the interpreter is shutting down normally


class HangMonitor(MonitorBase):
    """Emits one ``HANG`` fault per generation, with stack dumps as evidence."""

    name = "hang"

    def __init__(self, config: HangConfig | None = None) -> None:
        super().__init__()
        self.config = config or HangConfig()
        self._ranks: dict[int, _Rank] = {}
        self._phase = _Phase.WATCHING
        self._started = 0.0
        self._last_line = 0.0
        self._stopped_since: dict[int, float] = {}
        self._dump: StackDump | None = None
        self._verdict: dict[str, Any] = {}
        # rank -> (step of the last declared hang, how many times in a row at that step)
        self._repeats: dict[int, tuple[int, int]] = {}

    def _on_start(self, ctx: MonitorContext) -> None:
        # Learned intervals carry over to the next generation (a restarted job steps at the same
        # pace); progress and notices do not.
        for r in self._ranks.values():
            r.last_step, r.last_time, r.reports = -1, 0.0, 0
            r.busy_until, r.busy_at, r.exiting = 0.0, 0.0, False
        self._phase = _Phase.WATCHING
        self._started = ctx.clock()
        self._last_line = self._started
        self._stopped_since = {}
        self._dump = None
        self._verdict = {}

    def _report(self, report: Report) -> None:
        with self._lock:
            if not self._current(report):
                return
            now = self._now()
            r = self._ranks.get(report.rank)
            if r is None:
                r = self._ranks[report.rank] = _Rank(report.rank, report.local_rank)
                r.intervals = deque(maxlen=self.config.window)
            if report.metrics and self._notice(r, report, now):
                return
            if report.step == r.last_step:
                return  # a repeated step is not progress; a lower one is (a per-epoch counter)
            announced = r.busy_at > r.last_time  # a busy() notice came in this gap: not a step's pace
            if r.reports > self.config.warmup and not announced:
                interval = now - r.last_time
                r.intervals.append(interval)
                if self.metrics is not None:
                    self.metrics.step_seconds.labels(rank=str(r.rank)).observe(interval)
            r.last_step, r.last_time = report.step, now
            r.reports += 1
            if self._phase is _Phase.DUMPING and report.rank in self._verdict.get("stalled_ranks", ()):
                self._phase, self._dump = _Phase.WATCHING, None  # it was slow, not hung: cancel
            if self.metrics is not None:
                label = str(r.rank)
                self.metrics.reports.labels(rank=label).inc()
                self.metrics.step.labels(rank=label).set(report.step)
                self.metrics.last_progress.labels(rank=label).set(now)

    def _notice(self, r: _Rank, report: Report, now: float) -> bool:
        """Handle ``busy()`` and exit notices; True if ``report`` was one."""
        if METRIC_EXITING in report.metrics:
            r.exiting = True
            return True
        if METRIC_BUSY in report.metrics:
            r.busy_until = max(r.busy_until, now + report.metrics[METRIC_BUSY])
            r.busy_at = now
            return True
        return False

    def _line(self, local_rank: int, line: str) -> None:
        self._last_line = self._now()  # a float store: atomic, no lock needed on the reader threads

    # -- decisions ----------------------------------------------------------------------------------
    def timeout_for(self, r: _Rank) -> float:
        """The current hang timeout of rank ``r`` in seconds."""
        c = self.config
        if r.reports <= c.warmup or len(r.intervals) < c.min_intervals:
            timeout = c.startup_timeout
        else:
            recent = list(r.intervals)[-c.recent :]
            typical = max(statistics.median(r.intervals), statistics.median(recent))
            timeout = max(c.factor * typical, 1.5 * max(r.intervals), c.floor)
        step, count = self._repeats.get(r.rank, (-2, 0))
        if step == r.last_step and count > 0:
            timeout *= c.repeat_backoff**count
        return timeout

    def _check(self, now: float) -> None:
        if self._phase is _Phase.FIRED:
            return
        if self._phase is _Phase.DUMPING:
            assert self._dump is not None
            if self._dump.done(now):
                self._fire()
            return
        verdict = self._stalled(now) or self._stopped(now) or self._silent(now)
        if verdict is not None:
            self._begin_dump(now, verdict)

    def _stalled(self, now: float) -> dict[str, Any] | None:
        stalled = []
        for r in sorted(self._ranks.values(), key=lambda r: r.rank):
            if r.exiting or r.reports == 0:
                continue
            timeout = max(self.timeout_for(r), r.busy_until - r.last_time)
            since = now - r.last_time
            if self.metrics is not None:
                self.metrics.hang_timeout.labels(rank=str(r.rank)).set(timeout)
                self.metrics.hang_score.labels(rank=str(r.rank)).set(since / timeout)
            if since >= timeout:
                stalled.append((since, r, timeout))
        if not stalled:
            return None
        stalled.sort(key=lambda x: -x[0])
        since, worst, timeout = stalled[0]
        return {
            "mode": "reports",
            "rank": worst.rank,
            "local_rank": worst.local_rank,
            "stalled_ranks": [r.rank for _, r, _ in stalled],
            "last_step": worst.last_step,
            "seconds_since_progress": round(since, 3),
            "timeout_s": round(timeout, 3),
            "median_interval_s": round(statistics.median(worst.intervals), 4) if worst.intervals else None,
            "message": (
                f"rank {worst.rank} made no progress for {since:.1f}s after step {worst.last_step} "
                f"(timeout {timeout:.1f}s)"
            ),
        }

    def _stopped(self, now: float) -> dict[str, Any] | None:
        assert self.ctx is not None
        for local_rank, pid in sorted(self.ctx.worker_pids.items()):
            if proc_state(pid) != "T":
                self._stopped_since.pop(local_rank, None)
                continue
            since = self._stopped_since.setdefault(local_rank, now)
            if now - since >= self.config.stopped_grace:
                rank = self.ctx.global_ranks.get(local_rank, local_rank)
                r = self._ranks.get(rank)
                return {
                    "mode": "stopped",
                    "rank": rank,
                    "local_rank": local_rank,
                    "stalled_ranks": [rank],
                    "last_step": r.last_step if r else None,
                    "seconds_stopped": round(now - since, 3),
                    "message": f"rank {rank} (pid {pid}) is stopped (SIGSTOP or frozen) for {now - since:.1f}s",
                }
        return None

    def _silent(self, now: float) -> dict[str, Any] | None:
        silence = self.config.log_silence
        if silence <= 0 or any(r.reports for r in self._ranks.values()):
            return None  # reports drive detection once any rank sends them
        quiet = now - max(self._last_line, self._started)
        if quiet < silence:
            return None
        return {
            "mode": "log_silence",
            "rank": None,
            "local_rank": None,
            "stalled_ranks": [],
            "seconds_silent": round(quiet, 3),
            "timeout_s": silence,
            "message": f"no report and no output line from any local rank for {quiet:.1f}s",
        }

    # -- evidence and the verdict -------------------------------------------------------------------
    def _begin_dump(self, now: float, verdict: dict[str, Any]) -> None:
        assert self.ctx is not None
        self._verdict = verdict
        self._dump = StackDump(
            stack_dir=self.ctx.stacks_path(), log_dir=self.ctx.log_dir, timeout=self.config.dump_timeout
        )
        self._dump.request(self.ctx.worker_pids, self.ctx.global_ranks, now)
        self._phase = _Phase.DUMPING
        if self._dump.done(now):  # nobody to wait for (all stopped, exited or without a handler)
            self._fire()

    def _fire(self) -> None:
        assert self._dump is not None
        v = dict(self._verdict)
        message = v.pop("message")
        rank, local_rank = v.pop("rank"), v.pop("local_rank")
        v["workers"] = self._dump.evidence()
        if self._dump.flight_recorder:
            v["flight_recorder"] = self._dump.flight_recorder
        v["last_steps"] = {str(r.rank): r.last_step for r in self._ranks.values()}
        if self.metrics is not None:
            for outcome, n in self._dump.outcome_counts().items():
                self.metrics.stack_dumps.labels(outcome=outcome).inc(n)
        if rank is not None and v.get("last_step") is not None:
            step, count = self._repeats.get(rank, (-2, 0))
            self._repeats[rank] = (v["last_step"], count + 1 if step == v["last_step"] else 1)
        dumped = [w["stacks"] for w in v["workers"].values() if w.get("stacks")]
        if dumped:
            message += f"; stacks in {', '.join(dumped)}"
        self._phase = _Phase.FIRED
        self._emit(
            Fault(
                kind=FaultKind.HANG,
                action=self.config.action,
                message=message,
                evidence=v,
                rank=rank,
                local_rank=local_rank,
                node=self._node(),
                source=self.name,
                observed_at=self._now(),
            )
        )
