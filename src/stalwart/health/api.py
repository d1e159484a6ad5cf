"""The contract between health monitors and the agent.

Monitors observe a node's workers (their reports, their output lines, the GPUs) and emit typed
``Fault`` records. They never stop workers: the agent's restart ladder decides what to do with a
``Fault``, records it in the recovery timeline and counts it in metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from stalwart.worker.api import Report

__all__ = ["Action", "Fault", "FaultKind", "Monitor", "MonitorContext"]


class FaultKind(StrEnum):
    """What went wrong.

    ============== ==========================================================
    WORKER_EXIT    a worker process exited non-zero or was killed
    USER_ERROR     a worker failed at start-up the same way twice (ImportError...)
    HANG           no rank progressed for longer than the hang timeout
    LOSS_NAN       a rank reported a NaN or infinite loss
    LOSS_SPIKE     the loss jumped far above its recent distribution
    STRAGGLER      a rank is persistently slower than the job median
    LOG_RULE       a log rule matched (CUDA/NCCL error, OOM, user rule...)
    GPU_XID        NVML reported an Xid event
    GPU_ECC        uncorrectable ECC errors or pending/failed row remapping
    GPU_LOST       the GPU fell off the bus or needs a reset
    GPU_THROTTLE   thermal or power throttling
    EFA            EFA device counters show errors
    NODE_LOST      another node left the rendezvous
    ============== ==========================================================
    """

    WORKER_EXIT = "worker_exit"
    USER_ERROR = "user_error"
    HANG = "hang"
    LOSS_NAN = "loss_nan"
    LOSS_SPIKE = "loss_spike"
    STRAGGLER = "straggler"
    LOG_RULE = "log_rule"
    GPU_XID = "gpu_xid"
    GPU_ECC = "gpu_ecc"
    GPU_LOST = "gpu_lost"
    GPU_THROTTLE = "gpu_throttle"
    EFA = "efa"
    NODE_LOST = "node_lost"


class Action(StrEnum):
    """What a monitor recommends; the agent's ladder has the last word.

    ``RESTART`` restarts the workers (from the last good checkpoint: workers reload it on start).
    ``REPLACE_NODE`` makes the agent exit with the "replace this node" code.
    ``STOP`` ends the job without spending the restart budget (a user error).
    """

    IGNORE = "ignore"
    WARN = "warn"
    SKIP = "skip"
    RESTART = "restart"
    REPLACE_NODE = "replace_node"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Fault:
    """A verdict from a monitor: what happened, where, the evidence, and the recommended action.

    ``evidence`` holds the facts behind the verdict (exit code, Xid, matched line, timings) and
    must not be empty: a verdict without evidence cannot be debugged after the restart.
    """

    kind: FaultKind
    action: Action
    message: str
    evidence: Mapping[str, Any]
    rank: int | None = None
    local_rank: int | None = None
    node: str | None = None
    source: str = ""
    observed_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.evidence:
            raise ValueError(f"Fault {self.kind.value} from {self.source or '?'} carries no evidence")
        if not self.message:
            raise ValueError(f"Fault {self.kind.value} from {self.source or '?'} has no message")

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return repr(v)
            if isinstance(v, Mapping):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, (str, int, float, bool)) or v is None:
                return v
            return str(v)

        return {
            "kind": self.kind.value,
            "action": self.action.value,
            "message": self.message,
            "evidence": clean(self.evidence),
            "rank": self.rank,
            "local_rank": self.local_rank,
            "node": self.node,
            "source": self.source,
            "observed_at": self.observed_at,
        }


@dataclass(slots=True)
class MonitorContext:
    """What the agent tells its monitors when workers (re)start.

    ``worker_pids`` maps local rank to pid for the current generation (set once the workers are
    launched: monitors start just before, so that they see every line); ``registry`` is the
    agent's Prometheus registry (monitors register their metrics there); ``clock`` returns
    wall-clock seconds and is injectable for tests. ``stack_dir`` is where workers write stack
    dumps (their ``STALWART_STACK_DIR``); empty means ``<log_dir>/stacks``.
    """

    node: str
    local_world_size: int
    global_ranks: Mapping[int, int]
    worker_pids: Mapping[int, int]
    log_dir: str
    generation: int = 0
    registry: Any = None
    clock: Callable[[], float] = time.time
    stack_dir: str = ""

    def stacks_path(self) -> str:
        """The directory of this generation's stack dumps."""
        return self.stack_dir or f"{self.log_dir}/stacks"


@runtime_checkable
class Monitor(Protocol):
    """A health monitor. ``on_report``/``on_line`` may be called from any thread.

    Lifecycle: ``start(ctx)`` on every (re)start of the workers, ``poll(now)`` every monitor
    interval from the agent's loop (returns new faults, each reported once), ``stop()`` when the
    workers stop.
    """

    name: str

    def start(self, ctx: MonitorContext) -> None: ...

    def on_report(self, report: Report) -> None: ...

    def on_line(self, local_rank: int, line: str) -> None: ...

    def poll(self, now: float) -> list[Fault]: ...

    def stop(self) -> None: ...
