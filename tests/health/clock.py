"""An injectable clock for monitor tests: time moves only when the test says so."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from stalwart.health.api import MonitorContext


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def context(
    clock: Clock, nproc: int = 2, pids: dict[int, int] | None = None, log_dir: str = "/nonexistent"
) -> MonitorContext:
    return MonitorContext(
        node="node0",
        local_world_size=nproc,
        global_ranks={lr: 10 + lr for lr in range(nproc)},
        worker_pids=pids or {},
        log_dir=log_dir,
        registry=CollectorRegistry(),
        clock=clock,
    )
