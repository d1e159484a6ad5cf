"""The health monitors' Prometheus metrics, registered once per registry.

Names follow Prometheus conventions: the ``stalwart_`` prefix, base units (seconds), ``_total``
on counters, and bounded labels only (``rank`` is bounded by the node's local world size; never
steps, pids or messages). GPU and EFA monitors add their own collectors (``gpu.py``, ``efa.py``).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["STEP_BUCKETS", "HealthMetrics", "metrics_for"]

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True)
class HealthMetrics:
    """Every metric the progress, loss, straggler and log monitors write."""

    registry: CollectorRegistry
    faults: Counter
    reports: Counter
    step: Gauge
    step_seconds: Histogram
    last_progress: Gauge
    hang_timeout: Gauge
    hang_score: Gauge
    loss: Gauge
    loss_nonfinite: Counter
    loss_spikes: Counter
    loss_zscore: Gauge
    straggler_score: Gauge
    log_rule_matches: Counter
    log_rule_state: Gauge
    stack_dumps: Counter


_cache: weakref.WeakKeyDictionary[CollectorRegistry, HealthMetrics] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def metrics_for(registry: Any) -> HealthMetrics:
    """The health metrics registered in ``registry`` (created on first use; ``None``: a private one)."""
    if registry is None:
        registry = CollectorRegistry()
    with _cache_lock:
        found = _cache.get(registry)
        if found is None:
            found = _create(registry)
            _cache[registry] = found
        return found


def _create(r: CollectorRegistry) -> HealthMetrics:
    return HealthMetrics(
        registry=r,
        faults=Counter(
            "stalwart_health_faults",
            "Faults raised by the health monitors, by kind and recommended action.",
            ["kind", "action"],
            registry=r,
        ),
        reports=Counter(
            "stalwart_worker_reports", "Progress reports received from workers.", ["rank"], registry=r
        ),
        step=Gauge("stalwart_training_step", "Last step reported by each rank.", ["rank"], registry=r),
        step_seconds=Histogram(
            "stalwart_step_duration_seconds",
            "Seconds between consecutive steps of each rank.",
            ["rank"],
            buckets=STEP_BUCKETS,
            registry=r,
        ),
        last_progress=Gauge(
            "stalwart_last_progress_timestamp_seconds",
            "Unix time of each rank's last progress (report, or output line without reports).",
            ["rank"],
            registry=r,
        ),
        hang_timeout=Gauge(
            "stalwart_hang_timeout_seconds", "Current hang timeout of each rank.", ["rank"], registry=r
        ),
        hang_score=Gauge(
            "stalwart_hang_score",
            "Seconds since progress divided by the hang timeout (1 or more: hang).",
            ["rank"],
            registry=r,
        ),
        loss=Gauge("stalwart_training_loss", "Last loss reported by each rank.", ["rank"], registry=r),
        loss_nonfinite=Counter(
            "stalwart_loss_nonfinite", "NaN or infinite losses seen.", ["rank"], registry=r
        ),
        loss_spikes=Counter("stalwart_loss_spikes", "Loss spikes detected.", ["rank"], registry=r),
        loss_zscore=Gauge(
            "stalwart_loss_zscore", "Robust z-score of each rank's last loss.", ["rank"], registry=r
        ),
        straggler_score=Gauge(
            "stalwart_straggler_score",
            "Each rank's median step time divided by the other ranks' median (1: typical).",
            ["rank"],
            registry=r,
        ),
        log_rule_matches=Counter(
            "stalwart_log_rule_matches", "Output lines matched by each log rule.", ["rule"], registry=r
        ),
        log_rule_state=Gauge(
            "stalwart_log_rule_state",
            "1 for each log rule's current worst state over the local ranks.",
            ["rule", "state"],
            registry=r,
        ),
        stack_dumps=Counter(
            "stalwart_stack_dumps", "Worker stack dumps requested, by outcome.", ["outcome"], registry=r
        ),
    )
