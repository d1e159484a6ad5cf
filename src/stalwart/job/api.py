"""The contract of ``stalwart.job``: job states, status records, log lines, the backend protocol.

Follows torch elastic's spec / live object / result triple: ``JobSpec`` (spec.py) is the frozen
blueprint, a backend's ``JobStatus`` the live view of one submitted job, ``JobDescription`` the
full picture ``describe`` shows. Nothing here does I/O or imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from stalwart.errors import JobError

if TYPE_CHECKING:
    from stalwart.job.spec import JobSpec

__all__ = [
    "Backend",
    "JobDescription",
    "JobExists",
    "JobNotFound",
    "JobState",
    "JobStatus",
    "LogLine",
    "NodeStatus",
    "parse_log_line",
]


class JobNotFound(JobError):
    """Raised when a named job does not exist on the chosen backend."""

    exit_code = 3


class JobExists(JobError):
    """Raised when creating a job whose name is already taken on the chosen backend."""

    exit_code = 4


class JobState(StrEnum):
    """Where a job is, the same words for every backend.

    ========= ===========================================================
    PENDING   submitted, no node running yet (pods pending, not admitted)
    RUNNING   at least one node is running
    SUCCEEDED every node finished with exit status 0
    FAILED    the job gave up: a node exited non-zero and the rest ended
    UNKNOWN   the backend cannot tell (a node vanished without a status)
    ========= ===========================================================
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node of a job: a local agent process or a pod."""

    name: str
    state: JobState
    pid: int | None = None
    exit_code: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class JobStatus:
    """The live view of one job, as ``list`` and ``status()`` return it."""

    name: str
    backend: str
    state: JobState
    nodes: str
    created_at: float | None = None
    restarts: int = 0
    message: str = ""
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class JobDescription:
    """Everything ``describe`` shows: status, nodes, restart history, checkpoints, recent incidents.

    ``history`` is one record per restart (time, node, reason); ``incidents`` holds the last
    incidents' timelines, each a list of events as the agents recorded them; ``timeline`` is the
    per-incident phase table (``stalwart events``) where the backend has one.
    """

    status: JobStatus
    node_states: tuple[NodeStatus, ...] = ()
    history: tuple[dict[str, Any], ...] = ()
    incidents: tuple[tuple[dict[str, Any], ...], ...] = ()
    where: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    timeline: str = ""
    checkpoints: dict[str, Any] = field(default_factory=dict)
    """The last checkpoint saved and loaded, and failure counts (``checkpoint_summary``)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.to_dict()
        return d


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of a job's output, with the node and the worker that wrote it.

    ``local_rank`` is ``None`` for the agent's own lines. ``rank`` is the global rank where the
    line carries it; otherwise the worker is named by its local rank on ``node``.
    """

    node: str
    rank: int | None
    text: str
    local_rank: int | None = None

    @property
    def who(self) -> str:
        if self.rank is not None:
            return f"rank{self.rank}"
        return "agent" if self.local_rank is None else f"local{self.local_rank}"

    def matches(self, rank: int | None) -> bool:
        """True if ``rank`` is None, or equals this line's global rank (local rank if unknown)."""
        if rank is None:
            return True
        return (self.rank if self.rank is not None else self.local_rank) == rank

    def render(self) -> str:
        return f"[{self.node} {self.who}] {self.text}"


# stalwart run's worker prefix "[<node>/<global rank>] ".
_AGENT_LINE = re.compile(r"^\[([^\]\s/]+)/(\d+)\] ?(.*)$")
# plain torchrun's tee prefix "[<role><local_rank>]:", then torch's own "[rank<N>]:" on some lines.
_TEE_LINE = re.compile(r"^\[[A-Za-z_]*?(\d+)\]:(.*)$")
_RANK_PREFIX = re.compile(r"^\[rank(\d+)\]:")


def parse_log_line(node: str, text: str) -> LogLine:
    """Split an agent's output line into the worker that wrote it and the text."""
    a = _AGENT_LINE.match(text)
    if a:
        return LogLine(node, int(a.group(2)), a.group(3))
    m = _TEE_LINE.match(text)
    if not m:
        return LogLine(node, None, text)
    body = m.group(2)
    g = _RANK_PREFIX.match(body)
    return LogLine(node, int(g.group(1)) if g else None, body, local_rank=int(m.group(1)))


class Backend(Protocol):
    """Where jobs run. The SDK and the CLI only talk to this."""

    name: str

    def create(self, spec: JobSpec) -> JobStatus: ...

    def list(self) -> list[JobStatus]: ...

    def status(self, name: str) -> JobStatus: ...

    def describe(self, name: str) -> JobDescription: ...

    def logs(
        self, name: str, *, follow: bool = False, node: str | None = None, rank: int | None = None
    ) -> Iterator[LogLine]: ...

    def events(self, name: str) -> list[dict[str, Any]]: ...

    def delete(self, name: str) -> None: ...
