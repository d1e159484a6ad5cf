"""The local backend's GPU split: each simulated node gets its own GPUs, or none."""

from __future__ import annotations

from pathlib import Path

import pytest

from stalwart.errors import JobError
from stalwart.job.local import LocalBackend, assign_gpus, visible_gpus
from stalwart.job.spec import parse_spec


def _spec(nodes: int, gpus: int, nproc: int = 1) -> object:
    return parse_spec(
        {
            "apiVersion": "stalwart.dev/v1",
            "name": "g",
            "script": __file__,
            "nodes": nodes,
            "nproc_per_node": nproc,
            "resources": {"gpus": gpus},
        }
    )


def test_each_node_gets_a_disjoint_slice_of_the_visible_gpus() -> None:
    assert assign_gpus(_spec(2, 2), ["0", "1", "2", "3", "4"]) == ["0,1", "2,3"]
    assert assign_gpus(_spec(3, 1), ["4", "6", "7"]) == ["4", "6", "7"]
    assert assign_gpus(_spec(2, 0), ["0", "1"]) == ["", ""]  # CPU job: hide the GPUs


def test_asking_for_more_gpus_than_the_machine_has_creates_nothing(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs", gpus=lambda: ["0"])
    with pytest.raises(
        JobError, match=r"2 local node\(s\) x 1 GPU\(s\) need 2 GPUs, this machine offers 1 \(0\)"
    ):
        backend.create(_spec(2, 1))
    assert not (tmp_path / "jobs" / "g").exists()
    with pytest.raises(JobError, match="offers none"):
        LocalBackend(tmp_path / "jobs", gpus=list).create(_spec(1, 1))


def test_visible_gpus_honours_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
