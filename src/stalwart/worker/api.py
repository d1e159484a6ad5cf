"""The contract between a worker process and its node's agent.

A worker learns where its agent listens from environment variables the agent sets, and sends
``Report`` records over a Unix datagram socket. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ENV_CHECKPOINT_MIRRORS",
    "ENV_CHECKPOINT_URI",
    "ENV_FAULT",
    "ENV_FAULT_MARKER_DIR",
    "ENV_GENERATION",
    "ENV_REPORT_SOCKET",
    "ENV_STACK_DIR",
    "METRIC_BUSY",
    "METRIC_EXITING",
    "STACK_DUMP_SIGNAL",
    "Report",
    "stack_dump_path",
]

ENV_REPORT_SOCKET = "STALWART_REPORT_SOCKET"
"""Path of the agent's Unix datagram socket. Unset: ``report`` only applies fault injection."""

ENV_GENERATION = "STALWART_GENERATION"
"""Job-wide restart generation of this worker (0 for the first start)."""

ENV_FAULT = "STALWART_FAULT"
"""Fault-injection spec; see ``stalwart.worker.faults``."""

ENV_FAULT_MARKER_DIR = "STALWART_FAULT_MARKER_DIR"
"""Directory where fired faults leave a marker so that each fires once per job."""

ENV_CHECKPOINT_URI = "STALWART_CHECKPOINT_URI"
"""The job's checkpoint location (a job spec's ``checkpoint.uri``); see ``Checkpointer.from_env``."""

ENV_CHECKPOINT_MIRRORS = "STALWART_CHECKPOINT_MIRRORS"
"""Comma-separated mirror locations of the job's checkpoints (``checkpoint.mirrors``)."""


@dataclass(frozen=True, slots=True)
class Report:
    """One record from a worker: progress, sent by ``stalwart.worker.report``, or an event.

    ``time`` is the worker's wall clock (``time.time()``) when the step completed.
    ``loss`` is ``None`` when the script did not pass one; it may be NaN or infinite.
    ``event``, when set, makes this an event for the agent's timeline and metrics (sent by
    ``stalwart.worker.event``, for example by the checkpointer): ``{"event": name, **fields}``
    with JSON-able fields. An event is not progress: ``step`` is only the last step reported.
    """

    rank: int
    local_rank: int
    step: int
    time: float
    pid: int
    generation: int = 0
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    event: dict[str, Any] | None = None

    def encode(self) -> bytes:
        d = asdict(self)
        # JSON has no NaN/Inf; keep them as strings so the agent sees exactly what the worker saw.
        if self.loss is not None and not math.isfinite(self.loss):
            d["loss"] = repr(self.loss)
        if d["event"] is None:
            del d["event"]
        return json.dumps(d, separators=(",", ":"), default=str).encode()

    @classmethod
    def decode(cls, data: bytes) -> Report:
        d: dict[str, Any] = json.loads(data)
        loss = d.get("loss")
        if isinstance(loss, str):
            d["loss"] = float(loss)
        return cls(**d)


METRIC_BUSY = "stalwart_busy_seconds"
"""Report metric sent by ``stalwart.worker.busy(seconds)``: the next step may take that long."""

METRIC_EXITING = "stalwart_exiting"
"""Report metric sent once when the worker's interpreter exits normally (``atexit``)."""

ENV_STACK_DIR = "STALWART_STACK_DIR"
"""Directory for stack dumps. Workers started by stalwart register ``faulthandler`` on
``STACK_DUMP_SIGNAL`` (all threads) writing to ``stack_dump_path(dir, rank, pid)``."""

STACK_DUMP_SIGNAL = (
    int(signal.SIGRTMIN) + 10 if hasattr(signal, "SIGRTMIN") else int(getattr(signal, "SIGUSR1", 10))
)
"""``SIGRTMIN+10`` (44 with glibc): a real-time signal, not SIGUSR1, which training code often
handles itself (SLURM's pre-emption warning, Lightning's requeue): a handler of its own would
replace faulthandler's, and a dump request would set off a save-and-requeue instead. Where there
are no real-time signals (macOS, where a script may import ``stalwart.worker`` to run without
stalwart), SIGUSR1."""


def stack_dump_path(stack_dir: str, rank: int, pid: int) -> str:
    """Where the worker with ``rank`` and ``pid`` writes its stack dump."""
    return f"{stack_dir}/stacks-rank{rank}-pid{pid}.txt"
