"""The agent while it runs: /status and /metrics answer; SIGTERM stops it cleanly; SIGKILL leaves no orphans."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import psutil

StalwartRunner = Any  # the ``stalwart`` fixture's type (tests/conftest.py)


def _status_url(log_dir: Path, node: str, wait_for: Any) -> str:
    path = log_dir / f"status-{node}.url"
    return str(wait_for(lambda: path.exists() and path.read_text().strip(), 60, what="the status endpoint"))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _descendants(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_status_and_metrics_answer_and_sigterm_stops_everything(
    stalwart: StalwartRunner, wait_for: Any
) -> None:
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--node-name",
        "s",
        "--shutdown-timeout",
        "10",
        *stalwart.tiny_args(10_000, "--step-time", "0.2"),
    )
    url = _status_url(stalwart.log_dir, "s", wait_for)
    assert url.startswith("http://127.0.0.1:")

    def running() -> dict[str, Any] | None:
        st = json.loads(_get(url + "/status"))
        ok = st["state"] == "running" and all(w["last_step"] for w in st["workers"])
        return st if ok and len(st["workers"]) == 2 else None

    st = wait_for(running, 120, what="both workers to report a step")
    assert st["generation"] == 0 and st["restarts"] == 0 and st["budget"]["max_restarts"] == 0
    assert st["incidents"] == []
    metrics = _get(url + "/metrics")
    assert "stalwart_generation 0.0" in metrics
    assert 'stalwart_workers{state="running"} 2.0' in metrics
    assert "stalwart_recovery_seconds_bucket" in metrics
    assert _get(url + "/status?x=1").startswith("{")

    tree = _descendants(p.pid)
    assert len(tree) >= 2
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, out
    assert "received SIGTERM: stopping workers" in out
    wait_for(lambda: _gone(tree), 10, what="every worker and standby to exit")
    assert json.loads((stalwart.log_dir / "events-s.jsonl").read_text().splitlines()[-1])["event"] == "exit"


def test_workers_die_with_a_sigkilled_agent(stalwart: StalwartRunner, wait_for: Any) -> None:
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "1",
        "--node-name",
        "k",
        *stalwart.tiny_args(10_000, "--step-time", "0.2"),
    )
    wait_for(lambda: stalwart.progress_of(0), 120, what="the worker's first step")
    tree = _descendants(p.pid)
    assert tree
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    wait_for(lambda: _gone(tree), 20, what="the orphaned workers to die (PDEATHSIG)")
