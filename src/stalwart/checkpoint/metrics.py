"""Prometheus metrics of checkpointing, registered once per registry."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CheckpointMetrics", "checkpoint_metrics"]


@dataclass(frozen=True, slots=True)
class CheckpointMetrics:
    saves: Counter
    save_failures: Counter
    mirror_failures: Counter
    blocking_seconds: Histogram
    last_step: Gauge


_lock = threading.Lock()
_by_registry: dict[int, tuple[CollectorRegistry, CheckpointMetrics]] = {}


def checkpoint_metrics(registry: Any = None) -> CheckpointMetrics:
    """The checkpoint metrics in ``registry`` (default: prometheus-client's global registry)."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(id(registry))
        if found is not None and found[0] is registry:
            return found[1]
        metrics = CheckpointMetrics(
            saves=Counter("stalwart_checkpoint_saves", "Checkpoint saves persisted.", registry=registry),
            save_failures=Counter(
                "stalwart_checkpoint_save_failures",
                "Checkpoint saves that failed to persist (training went on).",
                registry=registry,
            ),
            mirror_failures=Counter(
                "stalwart_checkpoint_mirror_failures",
                "Copies of a committed checkpoint to a mirror that failed (the checkpoint URI holds it).",
                registry=registry,
            ),
            blocking_seconds=Histogram(
                "stalwart_checkpoint_blocking_seconds",
                "Time the training loop was blocked by save().",
                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=registry,
            ),
            last_step=Gauge(
                "stalwart_checkpoint_last_step", "Step of the newest committed checkpoint.", registry=registry
            ),
        )
        _by_registry[id(registry)] = (registry, metrics)
        return metrics
