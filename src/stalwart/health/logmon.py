"""The log-rule monitor: applies ``LogRule``s to every output line of every local rank.

Per rule and rank the state moves WAITING -> HEALTHY on a match, -> SLOW after
``metricEvaluationDataPoints`` consecutive metric breaches (and back to HEALTHY on a good value),
-> FAULTED on a ``faultOnMatch`` match (terminal for the generation). Time limits are per rule over
the watched ranks: -> HANGING when no match came within ``expectedStartCutOffInSeconds`` of the
start, or for ``expectedRecurringFrequencyInSeconds``; a later match makes it HEALTHY again. Each
transition into SLOW, HANGING or FAULTED emits one fault.

Built-in rules classify a line (the first that matches wins). A Python traceback is collected until
its exception line (or ``traceback_wait`` seconds), so the fault names the exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from stalwart.health.api import Action, Fault, FaultKind, MonitorContext
from stalwart.health.base import MonitorBase
from stalwart.health.logrules import TRACEBACK_RULE, LogRule

__all__ = ["LogRuleMonitor", "RuleState"]

_MAX_LINE = 500
_MAX_TRACEBACK_LINES = 60
# torchrun --tee/--redirect prefixes ("[default0]:", "[rank3]:") before the text itself
_PREFIX = re.compile(r"^\[[\w.-]+\]:\s?")


class RuleState(StrEnum):
    WAITING = "waiting"
    HEALTHY = "healthy"
    SLOW = "slow"
    HANGING = "hanging"
    FAULTED = "faulted"


_DEFAULT_ACTION = {
    RuleState.SLOW: Action.WARN,
    RuleState.HANGING: Action.RESTART,
    RuleState.FAULTED: Action.RESTART,
}
_SEVERITY = list(RuleState)


@dataclass
class _RankState:
    state: RuleState = RuleState.WAITING
    breaches: int = 0
    stopped: bool = False


@dataclass
class _RuleRun:
    rule: LogRule
    ranks: dict[int, _RankState] = field(default_factory=dict)
    last_match: float | None = None
    timed_state: RuleState = RuleState.WAITING
    stopped: bool = False


@dataclass
class _Traceback:
    local_rank: int
    started: float
    lines: list[str]


class LogRuleMonitor(MonitorBase):
    """Evaluates user and built-in log rules on every rank's output."""

    name = "log_rules"

    def __init__(self, rules: list[LogRule], traceback_wait: float = 2.0) -> None:
        super().__init__()
        self.rules = rules
        self.traceback_wait = traceback_wait
        self._runs: list[_RuleRun] = []
        self._started = 0.0
        self._tracebacks: dict[int, _Traceback] = {}

    def _on_start(self, ctx: MonitorContext) -> None:
        self._runs = [_RuleRun(rule) for rule in self.rules]
        self._started = ctx.clock()
        self._tracebacks = {}

    def state(self, rule_name: str, local_rank: int | None = None) -> RuleState:
        """The rule's state on ``local_rank``, or its worst state over the ranks and its time limits."""
        with self._lock:
            for run in self._runs:
                if run.rule.name == rule_name:
                    if local_rank is not None:
                        rs = run.ranks.get(local_rank)
                        return rs.state if rs else RuleState.WAITING
                    states = [run.timed_state, *(r.state for r in run.ranks.values())]
                    return max(states, key=_SEVERITY.index)
        raise KeyError(rule_name)

    # -- lines ------------------------------------------------------------------------------------
    def _line(self, local_rank: int, line: str) -> None:
        with self._lock:
            if not self.running:
                return
            now = self._now()
            raw = line.rstrip("\r\n")
            text = _PREFIX.sub("", raw, count=1)  # for the built-in rules; user rules see the line
            if local_rank in self._tracebacks and self._continue_traceback(local_rank, text, now):
                return
            classified = False
            for run in self._runs:
                rule = run.rule
                if not rule.watches(local_rank):
                    continue
                rs = run.ranks.setdefault(local_rank, _RankState())
                if rs.stopped:
                    continue
                seen = text if rule.builtin else raw  # as HyperPod matches: the line as printed
                if rule.stop_pattern is not None and rule.stop_pattern.search(seen):
                    rs.stopped = run.stopped = True
                    continue
                if rule.builtin and classified:
                    continue
                m = rule.pattern.search(seen)
                if m is None:
                    continue
                classified = classified or rule.builtin
                run.last_match = now
                if run.timed_state in (RuleState.HANGING, RuleState.WAITING):
                    run.timed_state = RuleState.HEALTHY
                if self.metrics is not None:
                    self.metrics.log_rule_matches.labels(rule=rule.name).inc()
                self._match(run, rs, local_rank, m, seen, now)

    def _match(
        self, run: _RuleRun, rs: _RankState, local_rank: int, m: re.Match[str], text: str, now: float
    ) -> None:
        rule = run.rule
        if rs.state is RuleState.FAULTED:
            return
        if rule.fault_on_match:
            if rule.name == TRACEBACK_RULE:
                self._tracebacks[local_rank] = _Traceback(local_rank, now, [text])
                return
            rs.state = RuleState.FAULTED
            self._fault(
                rule, RuleState.FAULTED, local_rank, f"matched: {text[:200]}", {"line": text[:_MAX_LINE]}
            )
            return
        if rule.is_metric:
            raw = rule.metric(m)
            try:
                value = float(raw) if raw is not None else None
            except ValueError:
                value = None
            if value is None:
                return  # the group captured no number on this line
            if rule.compare(value):
                rs.breaches += 1
                if rs.breaches >= rule.data_points and rs.state is not RuleState.SLOW:
                    rs.state = RuleState.SLOW
                    self._fault(
                        rule,
                        RuleState.SLOW,
                        local_rank,
                        f"metric {value:g} {rule.operator} {rule.threshold:g} for {rs.breaches} consecutive lines",
                        {
                            "line": text[:_MAX_LINE],
                            "value": value,
                            "threshold": rule.threshold,
                            "operator": rule.operator,
                            "data_points": rs.breaches,
                        },
                    )
                return
            rs.breaches = 0
        rs.state = RuleState.HEALTHY

    def _continue_traceback(self, local_rank: int, text: str, now: float) -> bool:
        """Collect a traceback line; False when ``text`` ended the traceback (evaluate it too)."""
        tb = self._tracebacks[local_rank]
        tb.lines.append(text)
        stripped = text.strip()
        chained = stripped.startswith(("During handling", "The above exception")) or not stripped
        if (text[:1].isspace() or chained or stripped.startswith("Traceback (most recent")) and len(
            tb.lines
        ) < _MAX_TRACEBACK_LINES:
            return True
        self._finish_traceback(tb)
        return False  # the exception line itself goes through the rules too (e.g. OutOfMemoryError)

    def _finish_traceback(self, tb: _Traceback) -> None:
        del self._tracebacks[tb.local_rank]
        last = tb.lines[-1].strip()
        exception = (
            last.split(":", 1)[0] if last and not last.startswith(("Traceback", "File ")) else "unknown"
        )
        run = next(r for r in self._runs if r.rule.name == TRACEBACK_RULE)
        rs = run.ranks.setdefault(tb.local_rank, _RankState())
        if rs.state is RuleState.FAULTED:
            return
        rs.state = RuleState.FAULTED
        self._fault(
            run.rule,
            RuleState.FAULTED,
            tb.local_rank,
            f"Python traceback: {last[:200]}",
            {"exception": exception, "line": last[:_MAX_LINE], "traceback": "\n".join(tb.lines)[-4000:]},
        )

    # -- time limits --------------------------------------------------------------------------------
    def _check(self, now: float) -> None:
        for tb in list(self._tracebacks.values()):
            if now - tb.started >= self.traceback_wait:
                self._finish_traceback(tb)
        for run in self._runs:
            rule = run.rule
            if rule.is_timed and not run.stopped and run.timed_state is not RuleState.HANGING:
                why = None
                if (
                    run.last_match is None
                    and rule.start_cutoff is not None
                    and now - self._started >= rule.start_cutoff
                ):
                    why = f"no line matched within {rule.start_cutoff:g}s of the start"
                elif (
                    run.last_match is not None
                    and rule.recurring_frequency is not None
                    and now - run.last_match >= rule.recurring_frequency
                ):
                    why = f"no line matched for {now - run.last_match:.1f}s (expected every {rule.recurring_frequency:g}s)"
                if why is not None:
                    run.timed_state = RuleState.HANGING
                    self._fault(
                        rule,
                        RuleState.HANGING,
                        None,
                        why,
                        {
                            "seconds_since_match": None
                            if run.last_match is None
                            else round(now - run.last_match, 3),
                            "seconds_since_start": round(now - self._started, 3),
                        },
                    )
            if self.metrics is not None:
                worst = max([run.timed_state, *(r.state for r in run.ranks.values())], key=_SEVERITY.index)
                for s in RuleState:
                    self.metrics.log_rule_state.labels(rule=rule.name, state=s.value).set(
                        1 if s is worst else 0
                    )

    def _fault(
        self, rule: LogRule, state: RuleState, local_rank: int | None, why: str, evidence: dict[str, Any]
    ) -> None:
        action = rule.action or _DEFAULT_ACTION[state]
        if action is Action.IGNORE:
            return
        where = f" on local rank {local_rank}" if local_rank is not None else ""
        self._emit(
            Fault(
                kind=FaultKind.LOG_RULE,
                action=action,
                message=f"log rule '{rule.name}' is {state.value}{where}: {why}",
                evidence={
                    "rule": rule.name,
                    "state": state.value,
                    "pattern": rule.pattern.pattern,
                    **evidence,
                },
                rank=self._global_rank(local_rank) if local_rank is not None else None,
                local_rank=local_rank,
                node=self._node(),
                source=self.name,
                observed_at=self._now(),
            )
        )
