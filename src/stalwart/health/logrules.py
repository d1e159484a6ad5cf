"""Log rules: HyperPod's ``logMonitoringConfiguration`` format, validated, plus built-in rules.

A rule file is YAML or JSON: a list of rules, or a mapping holding one under
``logMonitoringConfiguration`` (optionally inside ``runPolicy`` or ``spec.runPolicy``, so a
HyperPodPyTorchJob's section can be pasted as is) or ``rules``. Fields (camelCase as in HyperPod;
snake_case is accepted too):

==================================== =========================================================
name                                 unique rule name (required)
logPattern                           regex searched anywhere in a line (required); group 1, or
                                     a group named ``metric``, is the rule's metric
expectedStartCutOffInSeconds         HANGING if no line matches this long after the start
expectedRecurringFrequencyInSeconds  HANGING if matches stop for this long
stopPattern                          regex: the rule is off after a line matches it
metricThreshold, operator            SLOW when ``metric OP threshold`` (a float; operators
                                     gt, gteq, lt, lteq, eq)
metricEvaluationDataPoints           that many consecutive SLOW lines before the verdict (1)
faultOnMatch                         FAULTED as soon as a line matches
action                               stalwart's extension: what to recommend (restart, warn,
                                     replace_node, stop, ignore); by default FAULTED and
                                     HANGING restart, SLOW warns
ranks                                stalwart's extension: local ranks to watch (all)
==================================== =========================================================

Differences from HyperPod's agent (its known defects): thresholds are floats (not ``int()``),
patterns are searched (not anchored ``re.match``), every local rank is watched (not only local
rank 0), time limits count from the latest match on any watched rank (so a line that only rank 0
prints does not make the other ranks "hang"), and every config error is reported at start with
the rule, the field and the reason.
"""

from __future__ import annotations

import difflib
import json
import operator as op
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stalwart.errors import ConfigError
from stalwart.health.api import Action

__all__ = ["BUILTIN_RULES", "OPERATORS", "LogRule", "builtin_rules", "load_rules", "parse_rules"]

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "gt": op.gt,
    "gteq": op.ge,
    "lt": op.lt,
    "lteq": op.le,
    "eq": op.eq,
}
_OPERATOR_ALIASES = {">": "gt", ">=": "gteq", "<": "lt", "<=": "lteq", "==": "eq", "ge": "gteq", "le": "lteq"}

# canonical name -> accepted spellings
_FIELDS: dict[str, tuple[str, ...]] = {
    "name": ("name",),
    "logPattern": ("logPattern", "log_pattern", "pattern"),
    "expectedStartCutOffInSeconds": ("expectedStartCutOffInSeconds", "expected_start_cutoff_in_seconds"),
    "expectedRecurringFrequencyInSeconds": (
        "expectedRecurringFrequencyInSeconds",
        "expected_recurring_frequency_in_seconds",
    ),
    "stopPattern": ("stopPattern", "stop_pattern"),
    "metricThreshold": ("metricThreshold", "metric_threshold"),
    "operator": ("operator",),
    "metricEvaluationDataPoints": ("metricEvaluationDataPoints", "metric_evaluation_data_points"),
    "faultOnMatch": ("faultOnMatch", "fault_on_match"),
    "action": ("action",),
    "ranks": ("ranks",),
}
_SPELLINGS = {s: canon for canon, spellings in _FIELDS.items() for s in spellings}


@dataclass(frozen=True, slots=True)
class LogRule:
    """One validated log rule. ``builtin`` rules classify a line; the first that matches wins."""

    name: str
    pattern: re.Pattern[str]
    start_cutoff: float | None = None
    recurring_frequency: float | None = None
    stop_pattern: re.Pattern[str] | None = None
    threshold: float | None = None
    operator: str | None = None
    data_points: int = 1
    fault_on_match: bool = False
    action: Action | None = None
    ranks: frozenset[int] | None = None
    builtin: bool = False

    @property
    def is_timed(self) -> bool:
        return self.start_cutoff is not None or self.recurring_frequency is not None

    @property
    def is_metric(self) -> bool:
        return self.threshold is not None

    def metric(self, m: re.Match[str]) -> str | None:
        if "metric" in self.pattern.groupindex:
            return m.group("metric")
        return m.group(1) if self.pattern.groups else None

    def compare(self, value: float) -> bool:
        assert self.operator is not None and self.threshold is not None
        return OPERATORS[self.operator](value, self.threshold)

    def watches(self, local_rank: int) -> bool:
        return self.ranks is None or local_rank in self.ranks


class _RuleError(ConfigError):
    pass


def _fail(where: str, field: str | None, why: str) -> ConfigError:
    return _RuleError(f"{where}: field '{field}': {why}" if field else f"{where}: {why}")


def _number(where: str, field: str, v: Any, *, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise _fail(where, field, f"must be a number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise _fail(where, field, f"must be a number, got {v!r}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise _fail(where, field, f"must be a finite number, got {v!r}")
    if positive and f <= 0:
        raise _fail(where, field, f"must be > 0 seconds, got {v!r}")
    return f


def _regex(where: str, field: str, v: Any) -> re.Pattern[str]:
    if not isinstance(v, str) or not v:
        raise _fail(where, field, f"must be a non-empty regular expression string, got {v!r}")
    try:
        return re.compile(v)
    except re.error as exc:
        raise _fail(where, field, f"invalid regular expression {v!r}: {exc}") from None


def parse_rule(raw: Any, where: str) -> LogRule:
    """Validate one rule mapping; ``where`` names it in errors (file and position)."""
    if not isinstance(raw, Mapping):
        raise _fail(where, None, f"a rule must be a mapping of fields, got {type(raw).__name__}")
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        canon = _SPELLINGS.get(str(key))
        if canon is None:
            close = difflib.get_close_matches(str(key), list(_SPELLINGS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(_FIELDS)}"
            raise _fail(where, str(key), f"unknown field{hint}")
        if canon in fields:
            raise _fail(where, str(key), "given twice (in two spellings)")
        fields[canon] = value
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, "name", f"every rule needs a non-empty name, got {name!r}")
    where = f"{where} '{name}'"
    if "logPattern" not in fields:
        raise _fail(where, "logPattern", "missing: every rule needs a regular expression")
    pattern = _regex(where, "logPattern", fields["logPattern"])
    stop = (
        _regex(where, "stopPattern", fields["stopPattern"]) if fields.get("stopPattern") is not None else None
    )
    cutoff = freq = threshold = None
    if fields.get("expectedStartCutOffInSeconds") is not None:
        cutoff = _number(where, "expectedStartCutOffInSeconds", fields["expectedStartCutOffInSeconds"])
    if fields.get("expectedRecurringFrequencyInSeconds") is not None:
        freq = _number(
            where, "expectedRecurringFrequencyInSeconds", fields["expectedRecurringFrequencyInSeconds"]
        )
    if fields.get("metricThreshold") is not None:
        threshold = _number(where, "metricThreshold", fields["metricThreshold"], positive=False)
    operator = fields.get("operator")
    if operator is not None:
        if not isinstance(operator, str) or _OPERATOR_ALIASES.get(operator, operator) not in OPERATORS:
            raise _fail(
                where, "operator", f"unknown operator {operator!r}; use one of {', '.join(OPERATORS)}"
            )
        operator = _OPERATOR_ALIASES.get(operator, operator)
    if (threshold is None) != (operator is None):
        missing = "operator" if operator is None else "metricThreshold"
        raise _fail(where, missing, "metricThreshold and operator must be given together")
    if threshold is not None and not pattern.groups:
        raise _fail(
            where, "logPattern", "a metric rule needs a capture group for the value, e.g. 'loss: (\\S+)'"
        )
    points = fields.get("metricEvaluationDataPoints", 1)
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise _fail(where, "metricEvaluationDataPoints", f"must be an integer >= 1, got {points!r}")
    fault = fields.get("faultOnMatch", False)
    if not isinstance(fault, bool):
        raise _fail(where, "faultOnMatch", f"must be true or false, got {fault!r}")
    action = None
    if fields.get("action") is not None:
        try:
            action = Action(str(fields["action"]).lower())
        except ValueError:
            raise _fail(
                where,
                "action",
                f"unknown action {fields['action']!r}; use one of {', '.join(a.value for a in Action)}",
            ) from None
    ranks = None
    if fields.get("ranks") not in (None, "all"):
        rs = fields["ranks"]
        if not isinstance(rs, list) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rs
        ):
            raise _fail(where, "ranks", f"must be 'all' or a list of local ranks (integers >= 0), got {rs!r}")
        ranks = frozenset(rs)
    if not (fault or threshold is not None or cutoff or freq):
        raise _fail(
            where,
            None,
            "the rule checks nothing: set faultOnMatch, a metric (metricThreshold and operator), "
            "expectedStartCutOffInSeconds or expectedRecurringFrequencyInSeconds",
        )
    return LogRule(
        name=name,
        pattern=pattern,
        start_cutoff=cutoff,
        recurring_frequency=freq,
        stop_pattern=stop,
        threshold=threshold,
        operator=operator,
        data_points=points,
        fault_on_match=fault,
        action=action,
        ranks=ranks,
    )


def _rule_list(doc: Any, source: str) -> list[Any]:
    if doc is None:
        return []
    if isinstance(doc, list):
        return doc
    if isinstance(doc, Mapping):
        for path in (
            ("logMonitoringConfiguration",),
            ("rules",),
            ("runPolicy", "logMonitoringConfiguration"),
            ("spec", "runPolicy", "logMonitoringConfiguration"),
        ):
            node: Any = doc
            for key in path:
                node = node.get(key) if isinstance(node, Mapping) else None
            if isinstance(node, list):
                return node
    raise ConfigError(
        f"{source}: expected a list of rules, or a mapping with 'logMonitoringConfiguration' or 'rules'"
    )


def parse_rules(doc: Any, source: str = "log rules") -> list[LogRule]:
    """Validate a parsed rule document (see the module docstring); raises ``ConfigError``."""
    rules = [parse_rule(raw, f"{source}: rule #{i + 1}") for i, raw in enumerate(_rule_list(doc, source))]
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(f"{source}: rule #{i + 1} '{rule.name}': field 'name': used by an earlier rule")
        seen.add(rule.name)
    return rules


def load_rules(path: str | Path) -> list[LogRule]:
    """Read and validate a YAML or JSON rule file; raises ``ConfigError`` naming rule and field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"log rules file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"log rules file {str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    return parse_rules(doc, str(p))


# Built-in classifiers. Order matters: the first built-in that matches a line wins (OOM before
# the generic CUDA error). Python tracebacks are collected over several lines by the monitor.
BUILTIN_RULES: list[dict[str, Any]] = [
    {
        "name": "cuda-oom",
        "logPattern": r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED",
        "faultOnMatch": True,
        "action": "restart",
    },
    {
        "name": "nccl-timeout",
        "logPattern": r"Watchdog caught collective operation timeout|watchdog got stuck|"
        r"Heartbeat monitor timed out|NCCL.{0,80}timed? ?out|ncclTimeout",
        "faultOnMatch": True,
        "action": "restart",
    },
    {
        "name": "nccl-error",
        "logPattern": r"NCCL error|ncclUnhandledCudaError|ncclSystemError|ncclInternalError|ncclRemoteError|"
        r"ncclInvalidUsage|ncclInvalidArgument|NCCL communicator was aborted",
        "faultOnMatch": True,
        "action": "restart",
    },
    {
        "name": "cuda-error",
        "logPattern": r"CUDA error: |CUDA_ERROR_[A-Z_]+|cudaError[A-Z]\w+|CUBLAS_STATUS_(?!SUCCESS)[A-Z_]+|"
        r"CUDNN_STATUS_(?!SUCCESS)[A-Z_]+|illegal memory access|device-side assert triggered|"
        r"unspecified launch failure|uncorrectable ECC error",
        "faultOnMatch": True,
        "action": "restart",
    },
    {
        "name": "python-traceback",
        "logPattern": r"Traceback \(most recent call last\):",
        "faultOnMatch": True,
        "action": "warn",
    },
]
TRACEBACK_RULE = "python-traceback"


def builtin_rules() -> list[LogRule]:
    """The built-in classifier rules, validated like user rules."""
    out = []
    for rule in parse_rules(BUILTIN_RULES, "built-in rules"):
        out.append(LogRule(**{**{f: getattr(rule, f) for f in LogRule.__slots__}, "builtin": True}))
    return out
