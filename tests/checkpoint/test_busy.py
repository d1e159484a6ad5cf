"""A blocking save tells the node's agent that the step will be long, so it is not taken for a hang."""

from __future__ import annotations

from pathlib import Path

from stalwart.worker.api import METRIC_BUSY

from .agent_socket import reports_of

SCRIPT = """
import sys, torch
from stalwart.checkpoint import CheckpointConfig, Checkpointer
ck = Checkpointer(sys.argv[1], CheckpointConfig(memory_tier=False, flush_on_sigterm=False), distributed=False)
ck.save(3, {"w": torch.ones(1024)}, blocking=True)
ck.close()
"""


def test_a_blocking_save_announces_itself_as_busy_to_the_agent(tmp_path: Path) -> None:
    reports = reports_of(tmp_path, SCRIPT, str(tmp_path / "ckpt"))
    busy = [r.metrics[METRIC_BUSY] for r in reports if METRIC_BUSY in r.metrics]
    assert busy and busy[0] >= 60.0, busy
    assert list((tmp_path / "ckpt").glob("step-*3/manifest.json")), "the save committed"
