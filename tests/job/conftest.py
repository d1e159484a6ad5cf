"""Shared fixtures for the job tests: a spec builder and a private jobs directory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

FULL: dict[str, Any] = {
    "apiVersion": "stalwart.dev/v1",
    "name": "llama-ft",
    "backend": "kubernetes",
    "image": "registry.example/stalwart:0.1.0",
    "script": "/workspace/examples/train.py",
    "args": ["--lr", "3e-4", "--name", "a b; rm -rf /"],
    "nodes": "2:4",
    "nproc_per_node": 8,
    "resources": {"gpus": 8, "efa": 32, "cpu": "180", "memory": "1800Gi"},
    "volumes": [
        {"name": "fsx", "mount_path": "/fsx", "pvc": "fsx-claim"},
        {"name": "data", "mount_path": "/data", "host_path": "/mnt/data", "read_only": True},
    ],
    "env": {"NCCL_DEBUG": "INFO"},
    "checkpoint": {"uri": "/fsx/llama-ft", "mirrors": ["s3://bucket/llama-ft"]},
    "restart": {"max_restarts": 5},
    "health": {
        "hang_timeout_s": 300,
        "log_rules": [
            {"name": "heartbeat", "log_pattern": ".*loss.*", "expected_recurring_frequency_s": 600},
            {
                "name": "tflops",
                "log_pattern": r".*TFLOPs: (\d+).*",
                "metric_threshold": 100,
                "operator": "lt",
            },
        ],
    },
    "spares": 1,
    "scheduling": {
        "queue": "team-a",
        "priority": "high",
        "node_selector": {"pool": "gpu"},
        "instance_type": "ml.p5.48xlarge",
        "topology": {"preferred": "topology.k8s.aws/network-node-layer-3"},
        "service_account": "trainer",
    },
}


@pytest.fixture
def full_spec() -> dict[str, Any]:
    import copy

    return copy.deepcopy(FULL)


@pytest.fixture
def jobs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "stalwart-home"
    monkeypatch.setenv("STALWART_HOME", str(d))
    return d / "jobs"
