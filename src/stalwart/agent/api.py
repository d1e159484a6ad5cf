"""The agent's contract: its configuration and its errors. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stalwart.agent.policy import LADDER, RungSpec
from stalwart.errors import StalwartError
from stalwart.health.api import Monitor

__all__ = ["AgentConfig", "ScriptFailed", "StdSpec"]

StdSpec = Any
"""torch's ``Std`` or ``dict[int, Std]`` (per local rank), as ``Std.from_str`` returns it."""


class ScriptFailed(StalwartError):
    """Raised when a ``--pre-train-script`` or ``--post-train-script`` exits non-zero."""

    exit_code = 4


@dataclass(kw_only=True, slots=True)
class AgentConfig:
    """Everything one node's agent needs, resolved by the launcher from flags and environment.

    The agent never reads ``os.environ``: ``worker_env`` is the base environment of every worker
    (the agent adds ranks, store address, generation and report socket on top).
    """

    node: str
    """This node's name: the console prefix, the events file name (``events-<node>.jsonl``)."""
    nproc_per_node: int
    entrypoint: str
    """The training script, module (``module=True``) or binary (``no_python=True``)."""
    args: tuple[str, ...] = ()
    module: bool = False
    no_python: bool = False
    role: str = "default"
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = ""
    run_id: str = "none"
    min_nodes: int = 1
    max_nodes: int = 1
    rdzv_configs: dict[str, Any] = field(default_factory=dict)
    rdzv_poll_interval: float = 1.0
    """Seconds between polls of the rendezvous state while waiting for peers (torch: 1 s)."""
    local_addr: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    worker_host: str = "127.0.0.1"
    """Address at which group rank 0 serves the workers' store (reachable by every node)."""
    max_restarts: int = 0
    ladder: tuple[RungSpec, ...] = LADDER
    """The restart ladder's rungs (``policy.ladder_from_names``)."""
    monitor_interval: float = 0.1
    log_dir: str
    redirects: StdSpec = None
    tee: StdSpec = None
    local_ranks_filter: frozenset[int] | None = None
    worker_env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "."
    standby: int = 0
    standby_preload: Sequence[str] = ()
    status_host: str = "127.0.0.1"
    status_port: int | None = 0
    """0 picks a free port; None turns the endpoint off."""
    pre_train: Sequence[str] | None = None
    post_train: Sequence[str] | None = None
    startup_window: float = 60.0
    """A worker that dies within this many seconds of start, before its first report, died at start-up."""
    shutdown_timeout: float = 30.0
    """Grace between SIGTERM and SIGKILL when the agent itself is stopped."""
    restart_grace: float = 5.0
    """Grace between SIGTERM and SIGKILL when stopping workers for a restart."""
    exit_barrier_timeout: float = 300.0
    signals: tuple[int, ...] = (15, 2)
    """Signals the agent forwards to the workers before exiting (default SIGTERM, SIGINT)."""
    monitors: Sequence[Monitor] = ()
    log_events: bool = False
    """Also print each timeline event on the agent's output (``[stalwart NODE] event {...}``), for
    nodes whose log directory does not outlive them (Kubernetes pods)."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError("nproc_per_node must be >= 1")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if self.monitor_interval <= 0:
            raise ValueError("monitor_interval must be > 0")
