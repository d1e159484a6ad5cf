"""The restart ladder: agent states, rungs as data, and a pure ``decide``.

``decide`` only decides; the agent's loop executes the returned ``Decision`` (stop workers,
re-rendezvous, start workers, or exit). Because it is pure (time is passed in), every branch is
tested as a table in ``tests/agent/test_policy.py``.

Exit codes of ``stalwart run`` (the orchestrator keys off these):

===== =====================================================================
0     the workers succeeded
1     the job failed (the rendezvous was closed by another node, or the agent itself failed)
2     usage error (bad flags or config)
3     user error: the workers fail at start-up the same way every time
4     a pre- or post-train script failed
75    replace this node (a monitor found the node unfit; EX_TEMPFAIL)
76    the job-wide restart budget is spent: the orchestrator should replace the pod
128+N the agent was stopped by signal N and the workers did not exit 0
===== =====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from stalwart.health.api import Action, Fault, FaultKind

__all__ = [
    "EXIT_BUDGET_SPENT",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REPLACE_NODE",
    "EXIT_SCRIPT_FAILED",
    "EXIT_USAGE",
    "EXIT_USER_ERROR",
    "HAND_OVER_CODES",
    "LADDER",
    "AgentState",
    "Budget",
    "Decision",
    "Rung",
    "RungSpec",
    "Verdict",
    "decide",
    "ladder_from_names",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_USER_ERROR = 3
EXIT_SCRIPT_FAILED = 4
EXIT_REPLACE_NODE = 75
EXIT_BUDGET_SPENT = 76
"""The job-wide restart budget is spent: the ladder's last rung hands the pod to the orchestrator."""

HAND_OVER_CODES = frozenset({EXIT_REPLACE_NODE, EXIT_BUDGET_SPENT})
"""Exits that hand the node to the orchestrator: the rendezvous stays open for its replacement."""


class AgentState(StrEnum):
    """Where the agent is.

    ============ ============================================================
    INIT         parsing, starting servers; no workers yet
    RENDEZVOUS   waiting for the other agents of this generation
    RUNNING      workers are running and watched
    RESTARTING   stopping workers after a fault, before the next rendezvous
    STOPPING     a signal arrived: forwarding it, then exiting
    SUCCEEDED    the workers exited 0 (terminal)
    FAILED       the job ended in failure (terminal)
    ============ ============================================================
    """

    INIT = "init"
    RENDEZVOUS = "rendezvous"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Rung(StrEnum):
    """A step of the ladder, tried in order (see ``LADDER``)."""

    IN_PROCESS = "in_process"
    """Restart training inside the running workers (future work: disabled)."""
    STARTUP_RETRY = "startup_retry"
    """One free restart after a worker died at start-up, to tell a user error from a flake."""
    RESTART_WORKERS = "restart_workers"
    """Stop every node's workers, re-rendezvous, start them again; spends the job-wide budget."""
    EXIT = "exit"
    """Give up on this node: exit with a code that tells the orchestrator what to do."""


@dataclass(frozen=True, slots=True)
class RungSpec:
    """One rung as data: whether it is on and whether it spends the job-wide restart budget."""

    rung: Rung
    enabled: bool
    spends_budget: bool


LADDER: tuple[RungSpec, ...] = (
    RungSpec(Rung.IN_PROCESS, enabled=False, spends_budget=False),
    RungSpec(Rung.STARTUP_RETRY, enabled=True, spends_budget=False),
    RungSpec(Rung.RESTART_WORKERS, enabled=True, spends_budget=True),
    RungSpec(Rung.EXIT, enabled=True, spends_budget=False),
)


@dataclass(frozen=True, slots=True)
class Budget:
    """The job-wide restart budget as the agent last read it from the rendezvous store.

    ``startup_retries`` is this node's free start-up retries left (reset once workers progress).
    """

    max_restarts: int
    used: int
    startup_retries: int = 1

    @property
    def remaining(self) -> int:
        return max(0, self.max_restarts - self.used)


class Verdict(StrEnum):
    """What the loop must do."""

    CONTINUE = "continue"
    """Keep running (the fault is only logged)."""
    RESTART = "restart"
    """Stop workers, re-rendezvous, start the next generation."""
    EXIT = "exit"
    """Stop workers and exit with ``Decision.exit_code``."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The ladder's answer: what to do, on which rung, why, and the exit code if exiting."""

    verdict: Verdict
    reason: str
    rung: Rung | None = None
    exit_code: int | None = None
    spends_budget: bool = False


def ladder_from_names(names: Sequence[str]) -> tuple[RungSpec, ...]:
    """The ladder with exactly the named rungs enabled (``exit`` is always the last rung).

    Names must be rung values in ladder order (``startup_retry,restart_workers,exit``).
    Raises ``ValueError`` naming the bad rung and the fix.
    """
    order = [spec.rung.value for spec in LADDER]
    wanted = [n.strip() for n in names if n.strip()]
    for name in wanted:
        if name not in order:
            raise ValueError(f"unknown rung {name!r}; use {', '.join(order[1:])} (in that order)")
    if len(set(wanted)) != len(wanted):
        raise ValueError("a rung is listed twice")
    if wanted != sorted(wanted, key=order.index):
        raise ValueError(f"rungs must be in ladder order: {', '.join(order)}")
    if Rung.IN_PROCESS.value in wanted:
        raise ValueError("the in_process rung is not available yet; leave it out")
    return tuple(
        RungSpec(
            spec.rung,
            enabled=spec.rung is Rung.EXIT or spec.rung.value in wanted,
            spends_budget=spec.spends_budget,
        )
        for spec in LADDER
    )


def _rung(rung: Rung, ladder: Sequence[RungSpec]) -> RungSpec | None:
    for spec in ladder:
        if spec.rung is rung and spec.enabled:
            return spec
    return None


def _is_startup_failure(fault: Fault) -> bool:
    return fault.kind is FaultKind.WORKER_EXIT and bool(fault.evidence.get("startup"))


def decide(
    state: AgentState, fault: Fault, budget: Budget, now: float, ladder: Sequence[RungSpec] = LADDER
) -> Decision:
    """Decide what to do about ``fault`` observed in ``state`` with ``budget`` left at ``now``.

    Pure: it reads nothing but its arguments. ``now`` is wall-clock seconds (kept for rungs with
    deadlines, e.g. a future in-process restart window).
    """
    del now  # no rung has a deadline yet
    if state is not AgentState.RUNNING:
        return Decision(Verdict.CONTINUE, f"fault ignored while {state.value}")
    if fault.action in (Action.IGNORE, Action.WARN, Action.SKIP):
        return Decision(Verdict.CONTINUE, f"{fault.kind.value}: {fault.action.value} only")
    if fault.kind is FaultKind.USER_ERROR or fault.action is Action.STOP:
        return Decision(
            Verdict.EXIT, f"{fault.kind.value}: stopping (user error)", Rung.EXIT, EXIT_USER_ERROR
        )
    if fault.action is Action.REPLACE_NODE:
        return Decision(Verdict.EXIT, f"{fault.kind.value}: replace this node", Rung.EXIT, EXIT_REPLACE_NODE)
    # Action.RESTART: climb the ladder.
    if _is_startup_failure(fault) and budget.startup_retries > 0:
        spec = _rung(Rung.STARTUP_RETRY, ladder)
        if spec is not None:
            return Decision(
                Verdict.RESTART,
                f"{fault.kind.value} at start-up: one free retry to rule out a user error",
                spec.rung,
                spends_budget=spec.spends_budget,
            )
    spec = _rung(Rung.RESTART_WORKERS, ladder)
    if spec is not None and budget.remaining > 0:
        return Decision(
            Verdict.RESTART,
            f"{fault.kind.value}: restart {budget.used + 1} of {budget.max_restarts}",
            spec.rung,
            spends_budget=spec.spends_budget,
        )
    why = (
        "the restart_workers rung is off"
        if spec is None
        else f"restart budget spent ({budget.used} of {budget.max_restarts} used)"
    )
    return Decision(Verdict.EXIT, f"{fault.kind.value}: {why}", Rung.EXIT, EXIT_BUDGET_SPENT)
