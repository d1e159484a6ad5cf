"""The health metrics: names and types, ``promtool check metrics`` on the exposition, and a real
Prometheus scraping the agent's status server while real workers report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from stalwart.agent.status import AgentMetrics, StatusServer
from stalwart.health.api import FaultKind
from stalwart.health.efa import EfaMonitor
from stalwart.health.gpu import GpuConfig, GpuMonitor
from stalwart.health.hang import HangConfig, HangMonitor
from stalwart.health.logmon import LogRuleMonitor
from stalwart.health.logrules import builtin_rules
from stalwart.health.loss import LossMonitor
from stalwart.health.straggler import StragglerConfig, StragglerMonitor

from .fake_nvml import FakeGpu, FakeNvml
from .test_efa import _port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _monitors(tmp_path: Path) -> list[Any]:
    nvml = FakeNvml([FakeGpu("GPU-0"), FakeGpu("GPU-1")])
    nvml.xid(0, 13)
    _port(tmp_path / "sys", "rdmap0s31")
    return [
        HangMonitor(HangConfig(floor=5)),
        LossMonitor(),
        StragglerMonitor(StragglerConfig(window=5)),
        LogRuleMonitor(builtin_rules()),
        GpuMonitor(GpuConfig(threaded=False, check_interval=0.2), nvml=nvml),  # type: ignore[arg-type]
        EfaMonitor(sys_root=str(tmp_path / "sys"), check_interval=0.2),
    ]


def _dashboard_exprs() -> list[str]:
    """Every PromQL expression of the Grafana dashboard: panel targets and annotations."""
    dashboard = json.loads((Path(__file__).parents[2] / "dashboards" / "stalwart.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in dashboard["annotations"]["list"]]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:  # 127.0.0.1 only
        return json.loads(r.read())


def test_exposition_passes_promtool_and_prometheus_scrapes_the_agent(
    node, tmp_path: Path, prometheus_bin: Path
) -> None:
    registry = CollectorRegistry()
    agent_metrics = AgentMetrics(registry)  # the agent's own metrics share the registry, as in the agent
    agent_metrics.observe_checkpoint("checkpoint_saved", {"step": 40, "seconds": 0.31})  # a worker's event
    n = node(
        _monitors(tmp_path),
        nproc=2,
        args=["--step-time", "0.02"],
        registry=registry,
        fault="nan:rank=1:step=30",
    )
    assert n.wait_fault(FaultKind.LOSS_NAN, timeout=30) is not None
    n.poll()
    text = generate_latest(registry).decode()
    for name in (
        "stalwart_training_step",
        "stalwart_step_duration_seconds_bucket",
        "stalwart_health_faults_total",
        "stalwart_hang_score",
        "stalwart_straggler_score",
        "stalwart_loss_nonfinite_total",
        "stalwart_gpu_xid_errors_total",
        "stalwart_efa_port_active",
        "stalwart_log_rule_state",
        "stalwart_restarts_total",
        'stalwart_checkpoint_events_total{event="saved"}',
        'stalwart_checkpoint_step{event="saved"} 40.0',
        "stalwart_checkpoint_seconds_bucket",
    ):
        assert name in text, name

    lint = subprocess.run(
        [str(prometheus_bin / "promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

    server = StatusServer("127.0.0.1", 0, lambda: {"state": "running"}, registry)
    server.start()
    host, port = server.address
    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: stalwart\n    static_configs: [{{targets: ['{host}:{port}']}}]\n"
    )
    prom = subprocess.Popen(
        [
            str(prometheus_bin / "prometheus"),
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{prom_port}"
        query = urllib.parse.quote('stalwart_health_faults_total{kind="loss_nan"}')
        deadline = time.monotonic() + 60
        result: list[Any] = []
        while not result and time.monotonic() < deadline:
            try:
                result = _get(f"{base}/api/v1/query?query={query}")["data"]["result"]
            except OSError:
                pass  # not listening yet
            if not result:
                time.sleep(0.2)
        assert result, "Prometheus never scraped the fault counter"
        assert float(result[0]["value"][1]) == 1.0
        targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        steps = _get(f"{base}/api/v1/query?query=stalwart_training_step")["data"]["result"]
        assert {r["metric"]["rank"] for r in steps} == {"0", "1"}
        for expr in _dashboard_exprs():  # each of the dashboard's queries runs in a real Prometheus
            q = urllib.parse.quote(expr.replace("$job", ".*"))
            assert _get(f"{base}/api/v1/query?query={q}")["status"] == "success", expr
    finally:
        os.killpg(prom.pid, signal.SIGKILL)
        prom.wait(timeout=10)
        if prom.stderr is not None:
            prom.stderr.close()
        server.stop()


def test_every_metric_on_the_dashboard_is_exported(tmp_path: Path) -> None:
    import re

    from stalwart.health.api import MonitorContext
    from stalwart.worker.api import Report

    registry = CollectorRegistry()
    agent_metrics = AgentMetrics(registry)
    for event in ("checkpoint_saved", "checkpoint_loaded", "checkpoint_failed"):  # workers' events
        agent_metrics.observe_checkpoint(event, {"step": 8, "seconds": 0.5})
    monitors = _monitors(tmp_path)
    ctx = MonitorContext(
        node="n",
        local_world_size=2,
        global_ranks={0: 0, 1: 1},
        worker_pids={},
        log_dir=str(tmp_path),
        registry=registry,
    )
    for m in monitors:
        m.start(ctx)
    for step in range(1, 30):
        for rank in (0, 1):
            r = Report(
                rank=rank, local_rank=rank, step=step, time=step * 0.1, pid=1, loss=2.0 if step < 29 else 50.0
            )
            for m in monitors:
                m.on_report(r)
    for m in monitors:
        m.on_line(0, "RuntimeError: CUDA error: an illegal memory access was encountered")
        m.poll(time.time())
    exported = set()
    for name, kind in re.findall(r"^# TYPE (stalwart_\w+) (\w+)$", generate_latest(registry).decode(), re.M):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
        exported |= {name.removesuffix("_total") + s for s in suffixes}
    used = {name for e in _dashboard_exprs() for name in re.findall(r"stalwart_\w+", e)}
    assert len(used) > 25
    missing = sorted(used - exported)
    assert not missing, f"dashboard uses metrics nobody exports: {missing}"
