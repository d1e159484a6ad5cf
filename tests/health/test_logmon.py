"""The log-rule monitor on lines and an injected clock: every state and transition of a rule."""

from __future__ import annotations

from stalwart.health.api import Action, FaultKind
from stalwart.health.logmon import LogRuleMonitor, RuleState
from stalwart.health.logrules import builtin_rules, parse_rules

from .clock import Clock, context


def _monitor(rules: list[dict[str, object]], clock: Clock, builtins: bool = False) -> LogRuleMonitor:
    m = LogRuleMonitor(parse_rules(rules) + (builtin_rules() if builtins else []))
    m.start(context(clock))
    return m


def test_fault_on_match_searches_anywhere_on_every_rank() -> None:
    clock = Clock()
    m = _monitor([{"name": "fatal", "logPattern": "FATAL", "faultOnMatch": True}], clock)
    m.on_line(0, "step 3 ok\n")
    m.on_line(1, "[default1]: something FATAL happened\n")  # not at the line start, not rank 0
    faults = m.poll(clock())
    assert len(faults) == 1
    f = faults[0]
    assert f.kind is FaultKind.LOG_RULE and f.action is Action.RESTART
    assert (f.local_rank, f.rank) == (1, 11)
    assert f.evidence["rule"] == "fatal" and "FATAL happened" in f.evidence["line"]
    m.on_line(1, "FATAL again")
    assert m.poll(clock()) == []  # FAULTED is terminal for the generation: one fault
    assert m.state("fatal", 1) is RuleState.FAULTED


def test_a_user_rule_sees_the_line_as_printed_with_its_leading_tag() -> None:
    # HyperPod matches the raw line; stalwart stripped a leading "[ERROR]:" before every rule
    clock = Clock()
    m = _monitor([{"name": "err", "logPattern": r"^\[ERROR\]: CUDA", "faultOnMatch": True}], clock)
    m.on_line(0, "[ERROR]: CUDA error: an illegal memory access was encountered\n")
    [f] = m.poll(clock())
    assert f.evidence["rule"] == "err" and f.evidence["line"].startswith("[ERROR]: CUDA")


def test_metric_rule_needs_consecutive_breaches_and_compares_floats() -> None:
    clock = Clock()
    rule = {
        "name": "loss-high",
        "logPattern": r"loss=(?P<metric>[\d.]+)",
        "metricThreshold": 0.5,
        "operator": "gt",
        "metricEvaluationDataPoints": 3,
    }
    m = _monitor([rule], clock)
    for v in ("0.7", "0.8", "0.4", "0.6", "0.9"):  # the good value resets the count
        m.on_line(0, f"loss={v}")
    assert m.poll(clock()) == []
    assert m.state("loss-high", 0) is RuleState.HEALTHY
    m.on_line(0, "loss=0.51")
    [f] = m.poll(clock())
    assert f.action is Action.WARN and f.evidence["state"] == "slow"
    assert f.evidence["value"] == 0.51 and f.evidence["threshold"] == 0.5
    m.on_line(0, "loss=0.2")
    assert m.state("loss-high", 0) is RuleState.HEALTHY


def test_start_cutoff_and_recurring_frequency_count_matches_on_any_rank() -> None:
    clock = Clock()
    m = _monitor(
        [
            {"name": "start", "logPattern": "Experiment configuration", "expectedStartCutOffInSeconds": 60},
            {
                "name": "beat",
                "logPattern": r"step \d+",
                "expectedRecurringFrequencyInSeconds": 30,
                "action": "warn",
            },
        ],
        clock,
    )
    clock.advance(59)
    m.on_line(0, "step 1")
    assert m.poll(clock()) == []
    clock.advance(2)
    [f] = m.poll(clock())
    assert f.evidence["rule"] == "start" and f.evidence["state"] == "hanging" and f.action is Action.RESTART
    clock.advance(20)
    m.on_line(1, "step 2")  # only rank 1 prints it: no rank "hangs" because of that
    clock.advance(29)
    assert m.poll(clock()) == []
    clock.advance(2)
    [f] = m.poll(clock())
    assert f.evidence["rule"] == "beat" and f.action is Action.WARN
    assert m.state("beat") is RuleState.HANGING
    m.on_line(0, "step 3")
    assert m.state("beat") is RuleState.HEALTHY
    clock.advance(31)
    assert [x.evidence["rule"] for x in m.poll(clock())] == ["beat"]  # hangs again after recovering


def test_stop_pattern_turns_a_rule_off() -> None:
    clock = Clock()
    m = _monitor(
        [
            {
                "name": "beat",
                "logPattern": "step",
                "expectedRecurringFrequencyInSeconds": 10,
                "stopPattern": "Training finished",
            }
        ],
        clock,
    )
    m.on_line(0, "step 1")
    m.on_line(0, "Training finished, saving")
    clock.advance(100)
    assert m.poll(clock()) == []


def test_restart_resets_rule_state() -> None:
    clock = Clock()
    m = _monitor([{"name": "fatal", "logPattern": "FATAL", "faultOnMatch": True}], clock)
    m.on_line(0, "FATAL")
    assert len(m.poll(clock())) == 1
    m.stop()
    m.on_line(0, "FATAL")  # between generations: ignored
    m.start(context(clock))
    assert m.poll(clock()) == []
    m.on_line(0, "FATAL")
    assert len(m.poll(clock())) == 1


def test_builtins_classify_and_collect_a_traceback_until_its_exception() -> None:
    clock = Clock()
    m = _monitor([], clock, builtins=True)
    lines = [
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "train.py", line 10, in <module>',
        "[rank0]:     loss.backward()",
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
    ]
    for line in lines[:3]:
        m.on_line(0, line)
    assert m.poll(clock()) == []  # still collecting
    m.on_line(0, lines[3])
    faults = {f.evidence["rule"]: f for f in m.poll(clock())}
    assert set(faults) == {"python-traceback", "cuda-oom"}
    tb = faults["python-traceback"]
    assert tb.action is Action.WARN and tb.evidence["exception"] == "torch.OutOfMemoryError"
    assert "loss.backward()" in tb.evidence["traceback"]
    assert faults["cuda-oom"].action is Action.RESTART


def test_an_unfinished_traceback_is_reported_after_the_wait() -> None:
    clock = Clock()
    m = _monitor([], clock, builtins=True)
    m.on_line(1, "Traceback (most recent call last):")
    m.on_line(1, '  File "x.py", line 1')
    clock.advance(1)
    assert m.poll(clock()) == []
    clock.advance(1.5)
    [f] = m.poll(clock())
    assert f.local_rank == 1 and f.evidence["rule"] == "python-traceback"


def test_first_matching_builtin_wins_but_user_rules_all_apply() -> None:
    clock = Clock()
    m = _monitor(
        [{"name": "mine", "logPattern": "out of memory", "faultOnMatch": True, "action": "stop"}],
        clock,
        builtins=True,
    )
    m.on_line(0, "RuntimeError: CUDA error: out of memory")
    rules = sorted(f.evidence["rule"] for f in m.poll(clock()))
    assert rules == ["cuda-oom", "mine"]  # not also cuda-error
    registry = m.ctx.registry if m.ctx else None
    assert registry is not None
    assert registry.get_sample_value("stalwart_log_rule_matches_total", {"rule": "cuda-oom"}) == 1.0


def test_a_failing_monitor_never_raises_into_the_agent(caplog) -> None:
    clock = Clock()
    m = _monitor([{"name": "x", "logPattern": "x", "faultOnMatch": True}], clock)
    m._runs = None  # type: ignore[assignment]  # break it
    m.on_line(0, "x")
    m.on_line(0, "x")
    assert sum("failed in on_line" in r.message for r in caplog.records) == 1
    assert m.poll(clock()) == []
