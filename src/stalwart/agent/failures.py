"""Worker failures as data: which rank died first, how, with what traceback, and its signature."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from stalwart.health.api import Action, Fault, FaultKind

__all__ = ["WorkerFailure", "exit_fault", "format_failure", "root_cause"]


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """One worker that exited non-zero: torch's ``ProcessFailure`` plus what the agent saw."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    exited_at: float
    startup: bool
    """It died before its first report and within the start-up window."""
    stderr_tail: tuple[str, ...]
    error_file: str
    message: str
    traceback: str

    @classmethod
    def build(
        cls,
        *,
        rank: int,
        local_rank: int,
        pid: int,
        exitcode: int,
        exited_at: float,
        startup: bool,
        stderr_tail: Sequence[str],
        error_file: str,
    ) -> WorkerFailure:
        tb, message = "", f"exit code {exitcode}"
        try:
            pf = ProcessFailure(local_rank=local_rank, pid=pid, exitcode=exitcode, error_file=error_file)
        except Exception:  # a truncated or foreign error file must not take the agent down
            pf = None
        if pf is not None:
            message = pf.message
            data = pf.error_file_data.get("message") if isinstance(pf.error_file_data, dict) else None
            if isinstance(data, dict):
                tb = str(data.get("extraInfo", {}).get("py_callstack", ""))
        if not tb:
            tb = "\n".join(_last_traceback(stderr_tail))
        return cls(
            rank=rank,
            local_rank=local_rank,
            pid=pid,
            exitcode=exitcode,
            exited_at=exited_at,
            startup=startup,
            stderr_tail=tuple(stderr_tail),
            error_file=error_file,
            message=message,
            traceback=tb,
        )

    @property
    def how(self) -> str:
        if self.exitcode < 0:
            try:
                return f"signal {signal.Signals(-self.exitcode).name}"
            except ValueError:
                return f"signal {-self.exitcode}"
        return f"exit code {self.exitcode}"

    @property
    def signature(self) -> str:
        """What identifies "the same error": exit code and the last non-blank stderr line."""
        last = next((ln.strip() for ln in reversed(self.stderr_tail) if ln.strip()), "")
        return f"{self.exitcode}|{last}"


def _last_traceback(lines: Sequence[str]) -> list[str]:
    start = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            start = i
    if start is not None:
        return list(lines[start:])
    return list(lines[-15:])


def root_cause(failures: Sequence[WorkerFailure]) -> WorkerFailure:
    """The earliest failure; on a tie a signal death (the likely culprit) before an error exit."""
    return min(failures, key=lambda f: (f.exited_at, 0 if f.exitcode < 0 else 1, f.rank))


def format_failure(f: WorkerFailure, node: str) -> str:
    """A human summary of ``f``: rank, node, pid, exit code or signal, and its traceback."""
    lines = [f"  root cause: rank {f.rank} (local rank {f.local_rank} on {node}), pid {f.pid}, {f.how}"]
    if f.traceback:
        lines.append("  traceback:")
        lines.extend("    " + ln for ln in f.traceback.splitlines())
    else:
        lines.append("  (the worker printed no traceback)")
    return "\n".join(lines)


def exit_fault(
    failures: Sequence[WorkerFailure], last_startup_signature: str | None, node: str
) -> tuple[Fault, WorkerFailure]:
    """The agent's Fault for workers that exited non-zero, and its root cause.

    A start-up failure with the same signature as the previous generation's start-up failure
    is a USER_ERROR (stop); anything else is a WORKER_EXIT (restart).
    """
    cause = root_cause(failures)
    user_error = cause.startup and cause.exitcode > 0 and cause.signature == last_startup_signature
    kind = FaultKind.USER_ERROR if user_error else FaultKind.WORKER_EXIT
    fault = Fault(
        kind=kind,
        action=Action.STOP if user_error else Action.RESTART,
        message=f"rank {cause.rank} {cause.how}" + (" at start-up" if cause.startup else ""),
        evidence={
            "exit_code": cause.exitcode,
            "pid": cause.pid,
            "startup": cause.startup,
            "signature": cause.signature,
            "failed_ranks": sorted(f.rank for f in failures),
        },
        rank=cause.rank,
        local_rank=cause.local_rank,
        node=node,
        source="agent",
        observed_at=cause.exited_at,
    )
    return fault, cause
