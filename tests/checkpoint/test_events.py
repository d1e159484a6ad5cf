"""Checkpoint events reach the node's agent: what a worker's ``Checkpointer`` saves, fails to save,
skips on load and loads arrives over the real report channel (``stalwart.worker.event``), and a
real ``stalwart run`` agent turns them into its event log and its ``/metrics``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from stalwart.worker.api import Report

from .agent_socket import reports_of

StalwartRunner = Any  # the ``stalwart`` fixture's type (tests/conftest.py)

# Saves step 1, fails step 2 (a file stands where its directory goes), saves step 3, flips a byte
# of step 3's shard, then loads: step 3 is skipped as corrupt and step 1 loads. With a release
# file argument it then waits for that file, so the test can read the agent's /metrics.
SCRIPT = """
import os, sys, time, torch
from stalwart.checkpoint import CheckpointConfig, Checkpointer
root = sys.argv[1]
config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
ck = Checkpointer(root, config, distributed=False)
ck.save(1, {"w": torch.ones(1024)}, blocking=True)
open(os.path.join(root, "step-000000002"), "w").close()
assert ck.save(2, {"w": torch.ones(1024)}).result() is None
ck.save(3, {"w": torch.full((1024,), 3.0)}, blocking=True)
ck.close()
shard = os.path.join(root, "step-000000003", "rank-00000.safetensors")
with open(shard, "r+b") as f:
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 0xFF]))
loader = Checkpointer(root, config, distributed=False)
state = {"w": torch.zeros(1024)}
assert loader.load_latest(state) == 1 and float(state["w"][0]) == 1.0
loader.close()
print("loaded", flush=True)
if len(sys.argv) > 2:
    deadline = time.monotonic() + 120
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.05)
"""


def _events(reports: list[Report]) -> list[dict[str, Any]]:
    return [r.event for r in reports if r.event is not None]


def test_a_workers_checkpoints_are_reported_to_its_agent_as_events(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    reports = reports_of(tmp_path, SCRIPT, str(root))
    events = _events(reports)
    assert [e["event"] for e in events] == [
        "checkpoint_saved",
        "checkpoint_failed",
        "checkpoint_saved",
        "checkpoint_corrupt",
        "checkpoint_loaded",
    ], events
    saved, failed, _, corrupt, loaded = events
    assert saved["step"] == 1 and saved["uri"] == str(root) and saved["seconds"] > 0
    assert failed["step"] == 2 and "step-000000002" in failed["error"]
    assert corrupt["step"] == 3 and corrupt["tier"].startswith("durable tier")
    assert "rank-00000.safetensors" in corrupt["error"] and "checksum" in corrupt["error"]
    assert loaded["step"] == 1 and loaded["tier"].startswith("durable tier") and loaded["seconds"] > 0
    assert all(r.rank == 0 for r in reports if r.event is not None)


def test_the_agent_logs_checkpoint_events_and_exports_them_as_metrics(
    stalwart: StalwartRunner, tmp_path: Path, wait_for: Any
) -> None:
    script = tmp_path / "ckpt_events.py"
    script.write_text(SCRIPT)
    release = tmp_path / "release"
    p = stalwart.start(
        "--standalone", "--nproc-per-node", "1", "--no-standby", "--node-name", "c",
        str(script), str(tmp_path / "ckpt"), str(release),
    )  # fmt: skip
    try:
        url_file = stalwart.log_dir / "status-c.url"
        url = wait_for(lambda: url_file.exists() and url_file.read_text().strip(), 60, what="the status URL")

        def loaded() -> bool:
            return any(e["event"] == "checkpoint_loaded" for e in stalwart.events())

        wait_for(loaded, 120, what="the checkpoint_loaded event")
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:  # 127.0.0.1
            text = r.read().decode()
    finally:
        release.touch()
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out

    samples = {
        (s.name, s.labels.get("event")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("stalwart_checkpoint")
    }
    assert samples[("stalwart_checkpoint_events_total", "saved")] == 2
    assert samples[("stalwart_checkpoint_events_total", "failed")] == 1
    assert samples[("stalwart_checkpoint_events_total", "corrupt")] == 1
    assert samples[("stalwart_checkpoint_events_total", "loaded")] == 1
    assert samples[("stalwart_checkpoint_step", "saved")] == 3
    assert samples[("stalwart_checkpoint_step", "loaded")] == 1
    assert samples[("stalwart_checkpoint_seconds_count", "saved")] == 2

    events = [e for e in stalwart.events() if e["event"].startswith("checkpoint_")]
    assert [(e["event"], e.get("step")) for e in events] == [
        ("checkpoint_saved", 1),
        ("checkpoint_failed", 2),
        ("checkpoint_saved", 3),
        ("checkpoint_corrupt", 3),
        ("checkpoint_loaded", 1),
    ]
    assert all(e["node"] == "c" and e["rank"] == 0 for e in events)
    assert json.loads(json.dumps(events))  # plain JSON in the event log


def test_an_event_round_trips_and_cannot_pose_as_progress() -> None:
    report = Report(
        rank=3, local_rank=1, step=9, time=1.5, pid=7, event={"event": "checkpoint_saved", "step": 9}
    )
    assert Report.decode(report.encode()) == report
    plain = Report(rank=3, local_rank=1, step=9, time=1.5, pid=7)
    assert "event" not in json.loads(plain.encode())  # progress reports stay as small as before
    assert Report.decode(plain.encode()).event is None
