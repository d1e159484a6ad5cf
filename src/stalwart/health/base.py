"""Shared plumbing for monitors: the context, a lock, and the queue of faults not yet polled."""

from __future__ import annotations

import logging
import threading

from stalwart.health.api import Fault, MonitorContext
from stalwart.health.metrics import HealthMetrics, metrics_for
from stalwart.worker.api import Report

__all__ = ["MonitorBase"]

logger = logging.getLogger(__name__)


class MonitorBase:
    """Implements the ``Monitor`` protocol's bookkeeping; subclasses override the hooks they need.

    ``_emit`` queues a fault (from any thread) and counts it; ``poll`` returns the queue once.
    Subclasses override ``_on_start``, ``_report``, ``_line`` and ``_check(now)``; exceptions in
    them are logged once and never reach the agent.
    """

    name = "monitor"
    keep_pending_across_starts = False  # True: faults found between generations are still delivered

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pending: list[Fault] = []
        self.ctx: MonitorContext | None = None
        self.metrics: HealthMetrics | None = None
        self.running = False
        self._failures: set[str] = set()

    # -- the Monitor protocol -------------------------------------------------------------------
    def start(self, ctx: MonitorContext) -> None:
        with self._lock:
            self.ctx = ctx
            self.metrics = metrics_for(ctx.registry)
            if not self.keep_pending_across_starts:
                self._pending.clear()
            self._on_start(ctx)
            self.running = True

    def on_report(self, report: Report) -> None:
        """Called for every worker report (any thread); never raises."""
        try:
            self._report(report)
        except Exception:
            self._failed("on_report")

    def on_line(self, local_rank: int, line: str) -> None:
        """Called for every output line of every local rank (any thread); never raises."""
        try:
            self._line(local_rank, line)
        except Exception:
            self._failed("on_line")

    def poll(self, now: float) -> list[Fault]:
        with self._lock:
            if self.running:
                try:
                    self._check(now)
                except Exception:  # a monitor bug must never take the agent down
                    self._failed("poll")
            out, self._pending = self._pending, []
        return out

    def stop(self) -> None:
        with self._lock:
            self.running = False
            self._on_stop()

    # -- hooks ------------------------------------------------------------------------------------
    def _on_start(self, ctx: MonitorContext) -> None:
        pass

    def _report(self, report: Report) -> None:
        pass

    def _line(self, local_rank: int, line: str) -> None:
        pass

    def _on_stop(self) -> None:
        pass

    def _check(self, now: float) -> None:
        pass

    # -- helpers -----------------------------------------------------------------------------------
    def _emit(self, fault: Fault) -> None:
        with self._lock:
            self._pending.append(fault)
        if self.metrics is not None:
            self.metrics.faults.labels(kind=fault.kind.value, action=fault.action.value).inc()
        logger.warning("health[%s]: %s (%s)", self.name, fault.message, fault.action.value)

    def _failed(self, where: str) -> None:
        # A monitor bug must not kill the agent's reader threads; log the first one of each kind.
        if where not in self._failures:
            self._failures.add(where)
            logger.exception("health monitor %s failed in %s; it keeps running", self.name, where)

    def _now(self) -> float:
        return self.ctx.clock() if self.ctx is not None else 0.0

    def _node(self) -> str | None:
        return self.ctx.node if self.ctx is not None else None

    def _global_rank(self, local_rank: int) -> int | None:
        if self.ctx is None:
            return None
        return self.ctx.global_ranks.get(local_rank)

    def _current(self, report: Report) -> bool:
        """False for reports left over from an earlier generation of workers."""
        ctx = self.ctx
        return ctx is not None and self.running and report.generation >= ctx.generation
