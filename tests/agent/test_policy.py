"""The restart ladder as a table: a state, a fault and a budget in; one decision out."""

from __future__ import annotations

import pytest

from stalwart.agent.policy import (
    EXIT_BUDGET_SPENT,
    EXIT_REPLACE_NODE,
    EXIT_USER_ERROR,
    LADDER,
    AgentState,
    Budget,
    Rung,
    Verdict,
    decide,
    ladder_from_names,
)
from stalwart.health.api import Action, Fault, FaultKind

NOW = 1_000_000.0


def _fault(
    kind: FaultKind = FaultKind.WORKER_EXIT, action: Action = Action.RESTART, **evidence: object
) -> Fault:
    return Fault(kind=kind, action=action, message="m", evidence=evidence or {"exit_code": 1}, rank=1)


def _assert_decision(
    fault: Fault,
    budget: Budget,
    verdict: Verdict,
    rung: Rung | None = None,
    exit_code: int | None = None,
    spends: bool = False,
    state: AgentState = AgentState.RUNNING,
) -> None:
    d = decide(state, fault, budget, NOW)
    assert (d.verdict, d.rung, d.exit_code, d.spends_budget) == (verdict, rung, exit_code, spends), d.reason
    assert d.reason


def test_restarts_the_workers_when_budget_remains() -> None:
    _assert_decision(_fault(), Budget(3, 0), Verdict.RESTART, Rung.RESTART_WORKERS, spends=True)


def test_restarts_with_the_last_unit_of_budget() -> None:
    _assert_decision(_fault(), Budget(3, 2), Verdict.RESTART, Rung.RESTART_WORKERS, spends=True)


def test_exits_failed_when_the_budget_is_spent() -> None:
    _assert_decision(_fault(), Budget(3, 3), Verdict.EXIT, Rung.EXIT, EXIT_BUDGET_SPENT)


def test_exits_failed_at_once_with_a_zero_budget() -> None:
    _assert_decision(_fault(), Budget(0, 0), Verdict.EXIT, Rung.EXIT, EXIT_BUDGET_SPENT)


def test_gives_a_startup_failure_one_free_retry_even_with_a_zero_budget() -> None:
    _assert_decision(_fault(startup=True), Budget(0, 0), Verdict.RESTART, Rung.STARTUP_RETRY, spends=False)


def test_spends_budget_on_a_startup_failure_once_the_free_retry_is_used() -> None:
    _assert_decision(
        _fault(startup=True),
        Budget(2, 0, startup_retries=0),
        Verdict.RESTART,
        Rung.RESTART_WORKERS,
        spends=True,
    )


def test_stops_on_a_user_error_without_spending_budget() -> None:
    _assert_decision(
        _fault(FaultKind.USER_ERROR, Action.STOP), Budget(3, 0), Verdict.EXIT, Rung.EXIT, EXIT_USER_ERROR
    )


def test_stops_when_a_monitor_asks_to_stop() -> None:
    _assert_decision(
        _fault(FaultKind.LOG_RULE, Action.STOP), Budget(3, 0), Verdict.EXIT, Rung.EXIT, EXIT_USER_ERROR
    )


def test_asks_for_a_new_node_when_a_monitor_says_replace() -> None:
    _assert_decision(
        _fault(FaultKind.GPU_XID, Action.REPLACE_NODE),
        Budget(3, 0),
        Verdict.EXIT,
        Rung.EXIT,
        EXIT_REPLACE_NODE,
    )


@pytest.mark.parametrize("action", [Action.IGNORE, Action.WARN, Action.SKIP])
def test_keeps_running_on_advisory_faults(action: Action) -> None:
    _assert_decision(_fault(FaultKind.STRAGGLER, action), Budget(3, 3), Verdict.CONTINUE)


def test_restarts_on_a_hang_like_on_a_crash() -> None:
    _assert_decision(
        _fault(FaultKind.HANG, Action.RESTART),
        Budget(1, 0),
        Verdict.RESTART,
        Rung.RESTART_WORKERS,
        spends=True,
    )


@pytest.mark.parametrize("state", [s for s in AgentState if s is not AgentState.RUNNING])
def test_ignores_faults_outside_running(state: AgentState) -> None:
    _assert_decision(_fault(FaultKind.USER_ERROR, Action.STOP), Budget(3, 0), Verdict.CONTINUE, state=state)


@pytest.mark.parametrize("kind", list(FaultKind))
def test_every_fault_kind_gets_a_decision_with_a_reason(kind: FaultKind) -> None:
    for action in Action:
        d = decide(AgentState.RUNNING, _fault(kind, action), Budget(1, 0), NOW)
        assert d.verdict in Verdict and d.reason


def test_ladder_has_the_in_process_rung_first_and_disabled() -> None:
    assert [r.rung for r in LADDER] == [Rung.IN_PROCESS, Rung.STARTUP_RETRY, Rung.RESTART_WORKERS, Rung.EXIT]
    assert not LADDER[0].enabled
    assert [r.rung for r in LADDER if r.spends_budget] == [Rung.RESTART_WORKERS]


def test_budget_remaining_never_goes_negative() -> None:
    assert Budget(2, 5).remaining == 0
    assert Budget(2, 1).remaining == 1


def test_ladder_from_names_enables_exactly_the_named_rungs_and_always_exit() -> None:
    ladder = ladder_from_names(["restart_workers"])
    assert {r.rung: r.enabled for r in ladder} == {
        Rung.IN_PROCESS: False,
        Rung.STARTUP_RETRY: False,
        Rung.RESTART_WORKERS: True,
        Rung.EXIT: True,
    }
    assert ladder_from_names(["startup_retry", "restart_workers", "exit"]) == LADDER


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["restart_workers", "startup_retry"], "ladder order"),
        (["restart_workers", "restart_workers"], "listed twice"),
        (["reboot"], "unknown rung 'reboot'"),
        (["in_process", "exit"], "not available yet"),
    ],
)
def test_ladder_from_names_rejects_bad_ladders_naming_the_problem(names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ladder_from_names(names)


def test_without_the_restart_rung_a_fault_exits_at_once_with_budget_left() -> None:
    d = decide(
        AgentState.RUNNING, _fault(), Budget(3, 0, startup_retries=0), NOW, ladder_from_names(["exit"])
    )
    assert (d.verdict, d.exit_code) == (Verdict.EXIT, EXIT_BUDGET_SPENT)
    assert "restart_workers rung is off" in d.reason


def test_without_the_startup_retry_rung_a_startup_death_spends_the_budget() -> None:
    fault = Fault(
        kind=FaultKind.WORKER_EXIT,
        action=Action.RESTART,
        message="rank 0 exited 1",
        evidence={"exitcode": 1, "startup": True},
        rank=0,
    )
    d = decide(AgentState.RUNNING, fault, Budget(3, 0), NOW, ladder_from_names(["restart_workers", "exit"]))
    assert (d.verdict, d.rung, d.spends_budget) == (Verdict.RESTART, Rung.RESTART_WORKERS, True)
