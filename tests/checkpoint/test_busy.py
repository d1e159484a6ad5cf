"""A blocking save tells the node's agent that the step will be long, so it is not taken for a hang."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from pathlib import Path

from stalwart.worker.api import ENV_REPORT_SOCKET, METRIC_BUSY, Report
from stalwart.worker.channel import ReportReceiver

SCRIPT = """
import sys, torch
from stalwart.checkpoint import CheckpointConfig, Checkpointer
ck = Checkpointer(sys.argv[1], CheckpointConfig(memory_tier=False, flush_on_sigterm=False), distributed=False)
ck.save(3, {"w": torch.ones(1024)}, blocking=True)
ck.close()
"""


def test_a_blocking_save_announces_itself_as_busy_to_the_agent(tmp_path: Path) -> None:
    got: queue.Queue[Report] = queue.Queue()
    receiver = ReportReceiver(str(tmp_path / "agent.sock"), got.put)
    receiver.start()
    try:
        env = dict(os.environ, **{ENV_REPORT_SOCKET: receiver.path})
        subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], env=env, check=True, timeout=120
        )
        busy = []
        while not got.empty():
            rep = got.get_nowait()
            if METRIC_BUSY in rep.metrics:
                busy.append(rep.metrics[METRIC_BUSY])
        assert busy and busy[0] >= 60.0, busy
    finally:
        receiver.stop()
    assert list((tmp_path / "ckpt").glob("step-*3/manifest.json")), "the save committed"
