"""``stalwart health``: check log-rule files and probe this node's GPUs and EFA devices."""

from __future__ import annotations

import json
import time

import click

from stalwart.health.api import MonitorContext
from stalwart.health.efa import EfaMonitor
from stalwart.health.gpu import GpuConfig, GpuMonitor
from stalwart.health.logrules import LogRule, builtin_rules, load_rules

__all__ = ["health"]


@click.group("health")
def health() -> None:
    """Check health rules and probes."""


def _describe(rule: LogRule) -> str:
    checks = []
    if rule.fault_on_match:
        checks.append("fault on match")
    if rule.threshold is not None:
        checks.append(f"metric {rule.operator} {rule.threshold:g} x{rule.data_points}")
    if rule.start_cutoff is not None:
        checks.append(f"first match within {rule.start_cutoff:g}s")
    if rule.recurring_frequency is not None:
        checks.append(f"a match every {rule.recurring_frequency:g}s")
    if rule.stop_pattern is not None:
        checks.append(f"off after /{rule.stop_pattern.pattern}/")
    action = rule.action.value if rule.action else "default"
    return f"{rule.name:24} /{rule.pattern.pattern}/  {'; '.join(checks)}  [action: {action}]"


@health.command("check-rules")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--builtin/--no-builtin", default=True, help="Also list the built-in rules.")
def check_rules(file: str, builtin: bool) -> None:
    """Validate a YAML/JSON log-rule FILE (HyperPod logMonitoringConfiguration format)."""
    rules = load_rules(file)  # ConfigError -> clear message, exit 2
    click.echo(f"{file}: {len(rules)} rule(s) OK")
    for rule in rules:
        click.echo("  " + _describe(rule))
    if builtin:
        click.echo("built-in rules (turn off with --no-builtin-log-rules; loss lines are always read):")
        for rule in builtin_rules():
            click.echo("  " + _describe(rule))


@health.command("probe")
@click.option("--sys-root", default="/sys", show_default=True, help="Where sysfs is (for EFA counters).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def probe(sys_root: str, as_json: bool) -> None:
    """Read this node's GPUs (NVML) and EFA devices once and print what the monitors would report."""
    ctx = MonitorContext(node="probe", local_world_size=0, global_ranks={}, worker_pids={}, log_dir="/tmp")
    gpu = GpuMonitor(GpuConfig(threaded=False, check_interval=1e-9))
    efa = EfaMonitor(sys_root=sys_root, check_interval=1e-9)
    gpu.start(ctx)
    efa.start(ctx)
    now = time.time()
    faults = gpu.poll(now) + efa.poll(now)
    gpu.close()
    report = {
        "nvml": gpu.disabled or "ok",
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "healthy": g.healthy,
                "temperature_c": g.temperature,
                "power_w": g.power_w,
                "remapped_rows": g.remap,
                "recovery_action": g.recovery,
                "ecc_volatile": g.ecc,
                "unsupported": sorted(g.unsupported),
            }
            for g in gpu._gpus
        ],
        "efa": efa.disabled or "ok",
        "efa_ports": [
            {"device": p.device, "port": p.port, "active": p.active, "counters": p.counters}
            for p in efa._ports or []
        ],
        "faults": [f.to_json() for f in faults],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"NVML: {report['nvml']}")
    for g in report["gpus"]:
        click.echo(
            f"  GPU {g['index']} {g['uuid']}: healthy={g['healthy']} temp={g['temperature_c']}C "
            f"power={g['power_w']}W remapped_rows={g['remapped_rows']} recovery={g['recovery_action']}"
        )
    click.echo(f"EFA: {report['efa']}")
    for p in report["efa_ports"]:
        click.echo(f"  {p['device']} port {p['port']}: active={p['active']} {p['counters']}")
    for f in faults:
        click.echo(f"FAULT {f.kind.value} [{f.action.value}]: {f.message}")
