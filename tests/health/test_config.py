"""``add_health_arguments`` on torchrun's parser, and ``build_monitors``' errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from stalwart.errors import ConfigError
from stalwart.health.api import Action, Monitor
from stalwart.health.config import add_health_arguments, build_monitors, parse_xid_actions
from stalwart.health.efa import EfaMonitor
from stalwart.health.gpu import GpuMonitor
from stalwart.health.hang import HangMonitor
from stalwart.health.logmon import LogRuleMonitor
from stalwart.health.loss import LossMonitor
from stalwart.health.straggler import StragglerMonitor


def _parse(*argv: str) -> argparse.Namespace:
    parser = get_args_parser()
    add_health_arguments(parser)
    return parser.parse_args([*argv, "train.py"])


def test_defaults_build_every_monitor_and_they_follow_the_protocol() -> None:
    monitors = build_monitors(_parse())
    kinds = {type(m) for m in monitors}
    assert {HangMonitor, LossMonitor, StragglerMonitor, LogRuleMonitor, GpuMonitor, EfaMonitor} <= kinds
    assert all(isinstance(m, Monitor) for m in monitors)
    assert len({m.name for m in monitors}) == len(monitors)


def test_flags_reach_the_monitors(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {name: beat, logPattern: 'step \\d+', expectedRecurringFrequencyInSeconds: 30}\n")
    args = _parse(
        "--hang-factor",
        "4",
        "--hang-floor",
        "5",
        "--loss-spike-action",
        "restart",
        "--straggler-action",
        "replace_node",
        "--log-rules",
        str(rules),
        "--log-rule",
        json.dumps({"name": "fatal", "logPattern": "FATAL", "faultOnMatch": True}),
        "--log-fault-pattern",
        "Segmentation fault",
        "--no-builtin-log-rules",
    )
    by_type = {type(m): m for m in build_monitors(args)}
    hang = by_type[HangMonitor]
    assert isinstance(hang, HangMonitor) and (hang.config.factor, hang.config.floor) == (4.0, 5.0)
    loss = by_type[LossMonitor]
    assert isinstance(loss, LossMonitor) and loss.config.spike_action is Action.RESTART
    strag = by_type[StragglerMonitor]
    assert isinstance(strag, StragglerMonitor) and strag.config.action is Action.REPLACE_NODE
    logs = by_type[LogRuleMonitor]
    assert isinstance(logs, LogRuleMonitor)
    assert [r.name for r in logs.rules] == ["beat", "fatal", "fault-pattern-1"]


def test_switches_turn_monitors_off() -> None:
    monitors = build_monitors(
        _parse(
            "--no-hang-detection",
            "--no-straggler-detection",
            "--no-builtin-log-rules",
            "--no-nvml",
            "--no-efa",
        )
    )
    assert {type(m) for m in monitors} == {LossMonitor}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--hang-factor", "0"], "--hang-*: hang factor must be > 0"),
        (["--loss-spike-window", "1"], "--loss-*: loss spike window must be >= 2"),
        (["--straggler-threshold", "0.5"], "--straggler-*: straggler threshold must be > 1"),
        (["--log-rule", "{not json"], "--log-rule #1: not valid JSON"),
        (
            ["--log-rule", '{"name": "x", "logPattern": "(", "faultOnMatch": true}'],
            "--log-rule #1 'x': field 'logPattern'",
        ),
        (["--log-fault-pattern", "[oops"], "--log-fault-pattern #1 'fault-pattern-1': field 'logPattern'"),
        (["--log-rules", "/nonexistent/rules.yaml"], "cannot be read"),
        (["--xid-action", "79=explode"], "--xid-action '79=explode': expected XID=ACTION"),
        (["--gpu-check-interval", "0"], "--gpu-check-interval: gpu check interval must be > 0"),
        (["--efa-check-interval", "-1"], "--efa-check-interval: EFA check interval must be > 0"),
        (
            [
                "--log-fault-pattern",
                "a",
                "--log-rule",
                '{"name": "fault-pattern-1", "logPattern": "b", "faultOnMatch": true}',
            ],
            "given more than once",
        ),
    ],
)
def test_bad_flags_fail_at_start_naming_the_flag(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_monitors(_parse(*argv))
    assert expected in str(info.value)


def test_a_bare_namespace_gets_the_defaults() -> None:
    assert len(build_monitors(argparse.Namespace())) >= 4


def test_xid_actions_parse() -> None:
    assert parse_xid_actions(["31=ignore", "79=replace_node"]) == {31: Action.IGNORE, 79: Action.REPLACE_NODE}
    with pytest.raises(ConfigError, match="expected XID=ACTION"):
        parse_xid_actions(["31:ignore"])
