"""Health configuration at the edge: ``stalwart run`` flags and the monitors they build.

The launcher calls ``add_health_arguments`` on its parser and ``build_monitors`` with the parsed
namespace; the agent then drives the returned monitors through the ``Monitor`` protocol. Every
bad value raises ``ConfigError`` naming the flag (or the rule and field) and the fix, at start.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from stalwart.errors import ConfigError
from stalwart.health.api import Action, Monitor
from stalwart.health.efa import EfaMonitor
from stalwart.health.gpu import GpuConfig, GpuMonitor
from stalwart.health.hang import HangConfig, HangMonitor
from stalwart.health.logmon import LogRuleMonitor
from stalwart.health.logrules import LogRule, builtin_rules, load_rules, parse_rule
from stalwart.health.loss import LossConfig, LossMonitor
from stalwart.health.straggler import StragglerConfig, StragglerMonitor

__all__ = ["add_health_arguments", "build_monitors", "parse_xid_actions"]

_ACTIONS = [a.value for a in Action]


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the health flags (hang timeout, log rules, loss and straggler settings) to ``parser``."""
    g = parser.add_argument_group(
        "stalwart health", "Detection of hangs, bad loss, stragglers, log-rule matches and sick GPUs."
    )
    h, lo, s = HangConfig(), LossConfig(), StragglerConfig()
    g.add_argument("--no-hang-detection", action="store_true", help="Turn hang detection off.")
    g.add_argument(
        "--hang-factor",
        type=float,
        default=h.factor,
        metavar="K",
        help="Hang timeout = max(K x learned step interval, 1.5 x longest recent interval, floor) (default %(default)s).",
    )
    g.add_argument(
        "--hang-floor",
        type=float,
        default=h.floor,
        metavar="SECONDS",
        help="Shortest hang timeout (default %(default)s).",
    )
    g.add_argument(
        "--hang-startup-timeout",
        type=float,
        default=h.startup_timeout,
        metavar="SECONDS",
        help="Hang timeout before the step interval is learned (first steps; default %(default)s).",
    )
    g.add_argument(
        "--hang-log-silence",
        type=float,
        default=h.log_silence,
        metavar="SECONDS",
        help="Without reports: hang after this long with no output line from any rank; 0 turns it off (default %(default)s).",
    )
    g.add_argument(
        "--hang-action",
        choices=_ACTIONS,
        default=h.action.value,
        help="Action on a hang (default %(default)s).",
    )
    g.add_argument(
        "--stack-dump-timeout",
        type=float,
        default=h.dump_timeout,
        metavar="SECONDS",
        help="How long to wait for workers' stack dumps before acting on a hang (default %(default)s).",
    )
    g.add_argument(
        "--log-rules",
        metavar="FILE",
        help="YAML/JSON log rules (HyperPod logMonitoringConfiguration format; see 'stalwart health check-rules').",
    )
    g.add_argument(
        "--log-rule",
        action="append",
        default=[],
        metavar="JSON",
        help='One log rule as JSON, e.g. \'{"name": "fatal", "logPattern": "FATAL", "faultOnMatch": true}\' (repeatable).',
    )
    g.add_argument(
        "--log-fault-pattern",
        action="append",
        default=[],
        metavar="REGEX",
        help="Restart the workers when an output line matches REGEX (repeatable).",
    )
    g.add_argument(
        "--no-builtin-log-rules",
        action="store_true",
        help="Turn off the built-in rules (CUDA/NCCL errors and timeouts, OOM, tracebacks).",
    )
    g.add_argument(
        "--loss-nan-action",
        choices=_ACTIONS,
        default=lo.nan_action.value,
        help="Action on a NaN/Inf loss (default %(default)s: from the last good checkpoint).",
    )
    g.add_argument(
        "--loss-spike-action",
        choices=["ignore", "warn", "skip", "restart"],
        default=lo.spike_action.value,
        help="Action on a loss spike (default %(default)s).",
    )
    g.add_argument(
        "--loss-spike-window",
        type=int,
        default=lo.spike_window,
        metavar="N",
        help="Losses in the spike detector's window (default %(default)s).",
    )
    g.add_argument(
        "--loss-spike-sigma",
        type=float,
        default=lo.spike_sigma,
        metavar="Z",
        help="Robust z-score above which a loss is a spike (default %(default)s).",
    )
    g.add_argument(
        "--loss-spike-min-samples",
        type=int,
        default=lo.spike_min_samples,
        metavar="N",
        help="Losses needed before spikes are judged (default %(default)s).",
    )
    g.add_argument(
        "--no-loss-from-logs",
        action="store_true",
        help="Do not read 'loss: X' lines from the output (reports only).",
    )
    g.add_argument("--no-straggler-detection", action="store_true", help="Turn straggler detection off.")
    g.add_argument(
        "--straggler-threshold",
        type=float,
        default=s.threshold,
        metavar="X",
        help="A rank whose median step time is X times the ranks' median is a straggler (default %(default)s).",
    )
    g.add_argument(
        "--straggler-window",
        type=int,
        default=s.window,
        metavar="STEPS",
        help="Steps in each rank's median (default %(default)s).",
    )
    g.add_argument(
        "--straggler-patience",
        type=int,
        default=s.patience,
        metavar="STEPS",
        help="Steps a rank must stay above the threshold before it is reported (default %(default)s).",
    )
    g.add_argument(
        "--straggler-action",
        choices=["ignore", "warn", "restart", "replace_node"],
        default=s.action.value,
        help="Action on a straggler (default %(default)s; replace_node: restart without this node).",
    )
    g.add_argument("--no-nvml", action="store_true", help="Do not monitor GPUs through NVML.")
    g.add_argument(
        "--gpu-check-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="Seconds between NVML health reads (ECC, row remapping, throttling; default %(default)s).",
    )
    g.add_argument(
        "--xid-action",
        action="append",
        default=[],
        metavar="XID=ACTION",
        help="Override the action for an Xid, e.g. 31=ignore or 79=replace_node (repeatable).",
    )
    g.add_argument("--no-efa", action="store_true", help="Do not read EFA device counters.")
    g.add_argument(
        "--efa-check-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="Seconds between EFA counter reads (default %(default)s).",
    )


def _get(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, None)
    return default if v is None else v


def _config(flag: str, build: Any) -> Any:
    try:
        return build()
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _rules(args: argparse.Namespace) -> list[LogRule]:
    rules: list[LogRule] = []
    if _get(args, "log_rules", None):
        rules += load_rules(args.log_rules)
    for i, text in enumerate(_get(args, "log_rule", [])):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--log-rule #{i + 1}: not valid JSON ({exc}): {text!r}") from None
        rules.append(parse_rule(raw, f"--log-rule #{i + 1}"))
    for i, pattern in enumerate(_get(args, "log_fault_pattern", [])):
        rules.append(
            parse_rule(
                {"name": f"fault-pattern-{i + 1}", "logPattern": pattern, "faultOnMatch": True},
                f"--log-fault-pattern #{i + 1}",
            )
        )
    names = [r.name for r in rules]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"log rules: rule name(s) {sorted(dup)} given more than once; names must be unique")
    if not _get(args, "no_builtin_log_rules", False):
        rules += [r for r in builtin_rules() if r.name not in names]
    return rules


def build_monitors(args: argparse.Namespace) -> list[Monitor]:
    """Build the node's monitors from parsed flags; raises ``ConfigError`` on a bad config."""
    monitors: list[Monitor] = []
    h, lo, st = HangConfig(), LossConfig(), StragglerConfig()
    if not _get(args, "no_hang_detection", False):
        hang = _config(
            "--hang-*",
            lambda: HangConfig(
                factor=_get(args, "hang_factor", h.factor),
                floor=_get(args, "hang_floor", h.floor),
                startup_timeout=_get(args, "hang_startup_timeout", h.startup_timeout),
                log_silence=_get(args, "hang_log_silence", h.log_silence),
                dump_timeout=_get(args, "stack_dump_timeout", h.dump_timeout),
                action=Action(_get(args, "hang_action", "restart")),
            ),
        )
        monitors.append(HangMonitor(hang))
    loss = _config(
        "--loss-*",
        lambda: LossConfig(
            nan_action=Action(_get(args, "loss_nan_action", "restart")),
            spike_action=Action(_get(args, "loss_spike_action", "warn")),
            spike_window=_get(args, "loss_spike_window", lo.spike_window),
            spike_sigma=_get(args, "loss_spike_sigma", lo.spike_sigma),
            spike_min_samples=_get(args, "loss_spike_min_samples", lo.spike_min_samples),
            from_logs=not _get(args, "no_loss_from_logs", False),
        ),
    )
    monitors.append(LossMonitor(loss))
    if not _get(args, "no_straggler_detection", False):
        straggler = _config(
            "--straggler-*",
            lambda: StragglerConfig(
                threshold=_get(args, "straggler_threshold", st.threshold),
                window=_get(args, "straggler_window", st.window),
                patience=_get(args, "straggler_patience", st.patience),
                action=Action(_get(args, "straggler_action", "warn")),
            ),
        )
        monitors.append(StragglerMonitor(straggler))
    rules = _rules(args)
    if rules:
        monitors.append(LogRuleMonitor(rules))
    monitors += _device_monitors(args)
    return monitors


def parse_xid_actions(specs: list[str]) -> dict[int, Action]:
    """Parse ``--xid-action XID=ACTION`` values; raises ``ConfigError``."""
    out: dict[int, Action] = {}
    for spec in specs:
        xid, sep, action = spec.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(xid)] = Action(action.strip().lower())
        except ValueError:
            raise ConfigError(
                f"--xid-action {spec!r}: expected XID=ACTION with ACTION one of {', '.join(_ACTIONS)}, e.g. 31=ignore"
            ) from None
    return out


def _device_monitors(args: argparse.Namespace) -> list[Monitor]:
    monitors: list[Monitor] = []
    if not _get(args, "no_nvml", False):
        gpu = _config(
            "--gpu-check-interval",
            lambda: GpuConfig(
                check_interval=_get(args, "gpu_check_interval", 5.0),
                xid_actions=parse_xid_actions(_get(args, "xid_action", [])),
            ),
        )
        monitors.append(GpuMonitor(gpu))
    if not _get(args, "no_efa", False):
        interval = _get(args, "efa_check_interval", 10.0)
        monitors.append(_config("--efa-check-interval", lambda: EfaMonitor(check_interval=interval)))
    return monitors
