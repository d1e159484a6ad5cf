"""FSDP2 state through ``torch.distributed.checkpoint.state_dict``: 2 gloo ranks train a
``fully_shard`` model and save model and Adam state; 2 ranks load it back, and so does 1 rank
with a plain model (resharding the DTensor shards into whole tensors)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from .ranks import run_ranks

WORKER = Path(__file__).parent / "workers" / "fsdp_worker.py"


def _run(mode: str, world: int, root: Path, tmp_path: Path) -> None:
    store = tmp_path / f"store-{uuid.uuid4().hex[:6]}"
    args = ["--mode", mode, "--root", str(root), "--store", str(store), "--world", str(world)]
    args += ["--expected", str(tmp_path / "expected.pt")]
    results = run_ranks([[sys.executable, str(WORKER), *args, "--rank", str(r)] for r in range(world)])
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"{mode} rank {rank} of {world} failed:\n{out[-3000:]}"


def test_fsdp2_model_and_optimizer_state_save_and_load_on_two_ranks_and_on_one(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _run("save", 2, root, tmp_path)
    assert (root / "step-000000003" / "manifest.json").exists()
    assert sorted(p.name for p in (root / "step-000000003").glob("*.safetensors")) == [
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    ]  # each rank wrote its own shards
    _run("load", 2, root, tmp_path)
    _run("load", 1, root, tmp_path)  # 2 -> 1: whole tensors from the two ranks' shards
