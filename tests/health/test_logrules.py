"""Log-rule parsing: HyperPod's format, its defects fixed, and errors that name rule and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stalwart.errors import ConfigError
from stalwart.health.api import Action
from stalwart.health.logrules import BUILTIN_RULES, builtin_rules, load_rules, parse_rules

HYPERPOD_RULES = """
logMonitoringConfiguration:
  - name: "JobStart"
    logPattern: ".*Experiment configuration.*"
    expectedStartCutOffInSeconds: 120
  - name: "LossSpike"
    logPattern: "training_loss_step (\\\\d+(?:\\\\.\\\\d+)?)"
    metricThreshold: 0.5
    operator: "gt"
    metricEvaluationDataPoints: 5
  - name: "GPU Error"
    logPattern: ".*RuntimeError.*out of memory.*"
    faultOnMatch: true
"""


def test_reads_a_hyperpod_section_with_float_thresholds(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(HYPERPOD_RULES)
    rules = {r.name: r for r in load_rules(f)}
    assert set(rules) == {"JobStart", "LossSpike", "GPU Error"}
    assert rules["LossSpike"].threshold == 0.5  # HyperPod's int() made this 0
    assert rules["LossSpike"].data_points == 5
    assert rules["JobStart"].start_cutoff == 120
    assert rules["GPU Error"].fault_on_match


def test_accepts_json_a_plain_list_and_a_pasted_job_spec(tmp_path: Path) -> None:
    rule = {"name": "fatal", "log_pattern": "FATAL", "fault_on_match": True}
    (tmp_path / "r.json").write_text(json.dumps([rule]))
    assert [r.name for r in load_rules(tmp_path / "r.json")] == ["fatal"]
    spec = {"spec": {"runPolicy": {"logMonitoringConfiguration": [rule]}}}
    assert [r.name for r in parse_rules(spec)] == ["fatal"]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            {"name": "r", "logPattern": "loss (", "faultOnMatch": True},
            "'r': field 'logPattern': invalid regular",
        ),
        (
            {"name": "r", "logPattern": "x (\\d+)", "metricThreshold": 1, "operator": "gte"},
            "field 'operator': unknown operator 'gte'; use one of gt, gteq",
        ),
        (
            {"name": "r", "logPattern": "x", "expectedRecurringFrequencyInSeconds": -5},
            "field 'expectedRecurringFrequencyInSeconds': must be > 0 seconds, got -5",
        ),
        (
            {"name": "r", "logPatern": "x", "faultOnMatch": True},
            "field 'logPatern': unknown field; did you mean 'logPattern'?",
        ),
        ({"name": "r", "logPattern": "x", "metricThreshold": 2, "operator": "gt"}, "needs a capture group"),
        (
            {"name": "r", "logPattern": "x (\\d)", "metricThreshold": 2},
            "field 'operator': metricThreshold and operator",
        ),
        ({"name": "r", "logPattern": "x"}, "the rule checks nothing"),
        ({"logPattern": "x", "faultOnMatch": True}, "field 'name'"),
        (
            {"name": "r", "logPattern": "x", "faultOnMatch": "yes"},
            "field 'faultOnMatch': must be true or false",
        ),
        (
            {"name": "r", "logPattern": "x", "faultOnMatch": True, "action": "reboot"},
            "field 'action': unknown action",
        ),
        (
            {
                "name": "r",
                "logPattern": "x (\\d)",
                "metricThreshold": 1,
                "operator": "lt",
                "metricEvaluationDataPoints": 0,
            },
            "field 'metricEvaluationDataPoints': must be an integer >= 1",
        ),
    ],
)
def test_bad_rules_fail_naming_rule_and_field(rule: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules([{"name": "ok", "logPattern": "fine", "faultOnMatch": True}, rule], "rules.yaml")
    assert "rules.yaml: rule #2" in str(info.value)
    assert expected in str(info.value)


def test_duplicate_names_and_unreadable_or_malformed_files_are_errors(tmp_path: Path) -> None:
    rule = {"name": "a", "logPattern": "x", "faultOnMatch": True}
    with pytest.raises(ConfigError, match="rule #2 'a': field 'name': used by an earlier rule"):
        parse_rules([rule, rule])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_rules(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("rules: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_rules(tmp_path / "bad.yaml")
    (tmp_path / "odd.yaml").write_text("something: else")
    with pytest.raises(ConfigError, match="expected a list of rules"):
        load_rules(tmp_path / "odd.yaml")


def test_builtin_rules_are_valid_and_classify_common_failures() -> None:
    rules = builtin_rules()
    assert [r.name for r in rules] == [r["name"] for r in BUILTIN_RULES]
    assert all(r.builtin for r in rules)

    def first(line: str) -> str | None:
        return next((r.name for r in rules if r.pattern.search(line)), None)

    assert first("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == "cuda-oom"
    assert first("RuntimeError: CUDA error: an illegal memory access was encountered") == "cuda-error"
    assert (
        first("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)") == "nccl-timeout"
    )
    assert (
        first("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970") == "nccl-error"
    )
    assert first("Traceback (most recent call last):") == "python-traceback"
    assert first("step 10 loss: 2.31 lr 3e-4 CUBLAS_STATUS_SUCCESS") is None
    assert next(r for r in rules if r.name == "python-traceback").action is Action.WARN
