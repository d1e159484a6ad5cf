"""``stalwart health check-rules`` and ``stalwart health probe`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .test_efa import _port

STALWART = [sys.executable, "-m", "stalwart.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STALWART, "health", *args], capture_output=True, text=True, timeout=60)


def test_check_rules_lists_valid_rules_and_the_builtins(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(
        "logMonitoringConfiguration:\n  - {name: beat, logPattern: 'step \\d+', expectedRecurringFrequencyInSeconds: 60}\n"
    )
    out = _run("check-rules", str(f))
    assert out.returncode == 0, out.stderr
    assert "1 rule(s) OK" in out.stdout and "beat" in out.stdout and "a match every 60s" in out.stdout
    assert "cuda-oom" in out.stdout


def test_check_rules_names_rule_and_field_and_exits_non_zero(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("- {name: spike, logPattern: 'loss (\\S+)', metricThreshold: 2.0, operator: bigger}\n")
    out = _run("check-rules", str(f))
    assert out.returncode == 2
    assert "rule #1 'spike': field 'operator': unknown operator 'bigger'" in out.stderr
    assert "Traceback" not in out.stderr


def test_probe_reports_efa_from_sysfs_and_nvml_absence(tmp_path: Path) -> None:
    _port(tmp_path, "rdmap0s31", retrans_timeout_events=3)
    out = _run("probe", "--sys-root", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["efa"] == "ok"
    [port] = report["efa_ports"]
    assert port["device"] == "rdmap0s31" and port["active"] is True
    assert port["counters"]["retrans_timeout_events"] == 3
    assert report["nvml"] == "ok" or "NVML" in report["nvml"]
