"""The local backend end to end: real ``stalwart run`` agents, gloo workers, an injected crash.

Agents and workers bind their TCP stores on the wildcard address, so every job runs inside a
network namespace the test creates (loopback only). The CLI runs as a subprocess, like a user's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from stalwart.job.local import LocalBackend

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples" / "train.py"
STALWART = [sys.executable, "-m", "stalwart.cli"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for a network namespace"
)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stwjob-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """STALWART_HOME for the CLI; on the way out, kill whatever a failed test left running."""
    home = tmp_path / "home"
    yield home
    jobs = home / "jobs"
    for path in jobs.glob("*/state.json") if jobs.is_dir() else []:
        state = json.loads(path.read_text())
        LocalBackend._kill_nodes([*state["nodes"], state["store"]], grace=2.0)


def _cli(
    home: Path, *args: str, netns: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    argv = [*STALWART, "job", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    env = dict(os.environ, STALWART_HOME=str(home))
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=home.parent)


def _write_job(path: Path, name: str, **fields: Any) -> Path:
    spec = {
        "apiVersion": "stalwart.dev/v1",
        "name": name,
        "script": str(TRAIN),
        "nodes": 2,
        "nproc_per_node": 2,
        "health": {"hang_timeout_s": 30},  # the 2-core CI machine is noisy; only the crash matters
        **fields,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_two_node_job_recovers_from_a_crash_and_completes(tmp_path: Path, home: Path, netns: str) -> None:
    job = _write_job(
        tmp_path / "job.yaml",
        "e2e",
        args=[
            "--steps",
            "16",
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--ckpt-every",
            "4",
            "--step-time",
            "0.05",
        ],
        fault="crash:rank=1:step=6",
    )
    created = _cli(home, "create", "-f", str(job), netns=netns)
    assert created.returncode == 0, created.stderr
    assert "job 'e2e' created on local" in created.stdout

    again = _cli(home, "create", "-f", str(job), netns=netns)
    assert again.returncode == 4
    assert "already exists" in again.stderr

    assert json.loads((home / "jobs" / "e2e" / "state.json").read_text())["store"]["pid"] > 0
    follow = _cli(home, "logs", "e2e", "--follow", timeout=240)
    assert follow.returncode == 0, follow.stderr
    lines = follow.stdout.splitlines()
    assert lines and all(line.startswith("[node-") for line in lines)
    fired = [line for line in lines if "injecting fault 'crash:rank=1:step=6'" in line]
    assert len(fired) == 1 and " rank1] " in fired[0]
    crashed_node = fired[0][1:].split()[0]  # group ranks are assigned at rendezvous: look it up
    assert any(" rank0] " in line and "done steps 16" in line for line in lines)
    workers = {tuple(line[1:].split("]")[0].split()) for line in lines if " rank" in line.split("]")[0]}
    assert {w[1] for w in workers} == {"rank0", "rank1", "rank2", "rank3"}
    assert {w[0] for w in workers} == {"node-0", "node-1"}

    only = _cli(home, "logs", "e2e", "--rank", "3")
    assert only.returncode == 0
    assert only.stdout and all(" rank3] " in line for line in only.stdout.splitlines())
    node1 = _cli(home, "logs", "e2e", "--node", "1")
    assert node1.stdout and all(line.startswith("[node-1 ") for line in node1.stdout.splitlines())

    described = _cli(home, "describe", "e2e", "-o", "json")
    assert described.returncode == 0, described.stderr
    d = json.loads(described.stdout)
    assert d["status"]["state"] == "succeeded"
    assert d["status"]["restarts"] >= 1
    assert [n["exit_code"] for n in d["node_states"]] == [0, 0]
    first = d["history"][0]
    assert first["node"] == crashed_node and "worker_exit" in first["reason"]
    assert d["incidents"], "describe shows the crash's recovery timeline"
    kinds = [e["event"] for e in d["incidents"][0]]
    assert (
        kinds.index("fault") < kinds.index("restart") < kinds.index("rendezvous") < kinds.index("first_step")
    )
    assert "checkpoint_loaded" in kinds, "the recovery's reload is part of its timeline"
    ckpts = d["checkpoints"]  # the crash at step 6 resumes from step 4, saved every 4 steps
    assert ckpts["last_loaded"]["step"] == 4 and ckpts["last_loaded"]["tier"].startswith("durable tier")
    assert ckpts["last_saved"]["step"] == 16 and ckpts["last_saved"]["rank"] == 0
    assert (ckpts["failed_saves"], ckpts["skipped_on_load"]) == (0, 0)
    text = _cli(home, "describe", "e2e")
    assert "Checkpoints:" in text.stdout and "last loaded: step 4 from the durable tier" in text.stdout
    assert "Restart history:" in text.stdout and "worker_exit" in text.stdout
    assert "Recovery (seconds per phase):" in text.stdout and "incident -> generation 1" in text.stdout
    timeline = _cli(home, "events", "e2e")
    assert f"incident -> generation 1: worker_exit rank 1 on {crashed_node}" in timeline.stdout

    listed = json.loads(_cli(home, "list", "-o", "json").stdout)
    assert [(j["name"], j["state"]) for j in listed] == [("e2e", "succeeded")]

    # the store's supervisor records its exit once the store process has exited: after every node
    record = home / "jobs" / "e2e" / "store" / "exit.json"
    deadline = time.monotonic() + 30
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert record.exists() and json.loads(record.read_text())["returncode"] == 0, "the store outlived the job"
    deleted = _cli(home, "delete", "e2e")
    assert deleted.returncode == 0, deleted.stderr
    assert not (home / "jobs" / "e2e").exists()
    gone = _cli(home, "describe", "e2e")
    assert gone.returncode == 3
    assert "no local job named 'e2e'" in gone.stderr


def test_deleting_a_running_job_stops_every_process_it_started(
    tmp_path: Path, home: Path, netns: str
) -> None:
    job = _write_job(tmp_path / "job.yaml", "forever", nodes=1, nproc_per_node=1, args=["--steps", "100000"])
    assert _cli(home, "create", "-f", str(job), netns=netns).returncode == 0
    backend = LocalBackend(home / "jobs")
    # poll, with a deadline, until the agent has spawned its worker: then the whole tree exists
    deadline = time.monotonic() + 180
    while not any(e["event"] == "workers_started" for e in backend.events("forever")):
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.2)
    state = json.loads((home / "jobs" / "forever" / "state.json").read_text())
    top = psutil.Process(state["nodes"][0]["pid"])
    tree = [top, *top.children(recursive=True)]
    assert len(tree) >= 3  # supervisor, agent, worker (and warm standbys)
    store = psutil.Process(state["store"]["pid"])
    tree += [store, *store.children(recursive=True)]  # the rendezvous store's supervisor and server
    assert _cli(home, "delete", "forever").returncode == 0
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
