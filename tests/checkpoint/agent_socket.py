"""Running a worker script against a real report socket, as the node's agent would listen on."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path

from stalwart.worker.api import ENV_REPORT_SOCKET, METRIC_EXITING, Report
from stalwart.worker.channel import ReportReceiver


def reports_of(tmp_path: Path, script: str, *args: str, timeout: float = 120) -> list[Report]:
    """Run ``python -c script args...`` with the report socket set; every datagram it sent, in
    order. Waits for the exit notice the worker sends last (datagrams keep their order), so no
    report still in the socket's buffer is missed."""
    got: queue.Queue[Report] = queue.Queue()
    receiver = ReportReceiver(str(tmp_path / "agent.sock"), got.put)
    receiver.start()
    reports: list[Report] = []
    try:
        env = dict(os.environ, **{ENV_REPORT_SOCKET: receiver.path})
        subprocess.run([sys.executable, "-c", script, *args], env=env, check=True, timeout=timeout)
        deadline = time.monotonic() + 30
        while not (reports and METRIC_EXITING in reports[-1].metrics):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no exit notice after {[r.event or r.metrics for r in reports]}"
            reports.append(got.get(timeout=remaining))
    finally:
        receiver.stop()
    return reports
