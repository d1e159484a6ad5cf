"""World-size change with real gloo process groups: 2 ranks of DTensor shards -> 1 rank, and 1 -> 2."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch

from stalwart.checkpoint import CheckpointConfig, Checkpointer

from .ranks import run_ranks
from .workers.reshard_worker import full_state

WORKER = Path(__file__).parent / "workers" / "reshard_worker.py"


def _run_two_ranks(
    mode: str, root: Path, tmp_path: Path, shm: str | None = None, mirror: Path | None = None
) -> None:
    store = tmp_path / f"store-{mode}-{uuid.uuid4().hex[:6]}"
    extra = ["--shm", shm] if shm else []
    extra += ["--mirror", str(mirror)] if mirror else []
    argv = [sys.executable, str(WORKER), "--mode", mode, "--root", str(root), "--store", str(store), *extra]
    results = run_ranks([[*argv, "--rank", str(rank)] for rank in range(2)], timeout=120)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out[-3000:]}"


def _config() -> CheckpointConfig:
    return CheckpointConfig(memory_tier=False, flush_on_sigterm=False)


def test_two_sharded_ranks_save_and_one_rank_loads_the_whole_tensors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "ck"
    _run_two_ranks("save", root, tmp_path)
    manifest = json.loads((root / "step-000000007/manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sorted(manifest["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    rows = next(t for t in manifest["tensors"] if t["path"] == ["model", "rows"])
    assert sorted((c["offsets"], c["shape"]) for c in rows["chunks"]) == [([0, 0], [3, 3]), ([3, 0], [2, 3])]
    ck = Checkpointer(str(root), _config())
    target = {
        "model": {
            "rows": torch.zeros(5, 3),
            "cols": torch.zeros(4, 6, dtype=torch.int64),
            "repl": torch.zeros(7),
        },
        "rank_state": {"rng": torch.zeros(1, dtype=torch.int64)},
        "step": 0,
    }
    assert ck.load_latest(target) == 7
    full = full_state()
    for key in ("rows", "cols", "repl"):
        assert torch.equal(target["model"][key], full[key]), key
    assert target["rank_state"]["rng"].item() == 100
    assert (
        "saved by 2 ranks and is loaded by 1: rank R loads the 'rank_state' of saved rank R % 2"
        in caplog.text
    )
    assert "(the state of saved rank 1 is not loaded)" in caplog.text
    ck.close()


def test_one_rank_saves_and_two_sharded_ranks_load_their_slices(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    ck = Checkpointer(str(root), _config())
    full = full_state()
    ck.save(7, {"model": full, "rank_state": {"rng": torch.tensor([100])}, "step": 7}, blocking=True)
    ck.close()
    _run_two_ranks("load", root, tmp_path)  # each rank gets saved rank 0's rank_state, warned
    _run_two_ranks("load-strict", root, tmp_path)  # or refuses it, on every rank


def test_two_ranks_restarted_on_the_same_node_reload_replicas_from_their_memory_tier(
    tmp_path: Path, shm: str
) -> None:
    root = tmp_path / "ck"
    _run_two_ranks("save", root, tmp_path, shm)
    for shard in root.glob("step-000000007/rank-*.safetensors"):
        shard.unlink()  # only the memory tier can serve the reload now
    _run_two_ranks("load-same", root, tmp_path, shm)


def test_two_ranks_commit_on_a_mirror_and_reload_from_it_when_the_checkpoint_uri_lost_the_step(
    tmp_path: Path,
) -> None:
    root, mirror = tmp_path / "ck", tmp_path / "mirror"
    _run_two_ranks("save", root, tmp_path, mirror=mirror)
    manifest = json.loads((mirror / "step-000000007/manifest.json").read_text())
    assert manifest["world_size"] == 2  # rank 0 committed there after both ranks' parts arrived
    assert sorted(manifest["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    (root / "step-000000007" / "rank-00001.safetensors").unlink()
    _run_two_ranks("load-same", root, tmp_path, mirror=mirror)  # rank 1 from the mirror


def test_a_sharding_that_leaves_gaps_is_refused_naming_the_tensor() -> None:
    from stalwart.checkpoint.api import ChunkEntry, TensorEntry
    from stalwart.checkpoint.reshard import Box, plan_reads
    from stalwart.errors import CheckpointError

    half = ChunkEntry(
        file="rank-00000.safetensors", start=0, nbytes=24, offsets=[0, 0], shape=[2, 3], crcs=[0]
    )
    entry = TensorEntry(path=["model", "rows"], dtype="F32", global_shape=[4, 3], chunks=[half])
    assert len(plan_reads(entry, Box((0, 0), (2, 3)))) == 1  # the saved half is enough for this rank
    with pytest.raises(CheckpointError, match=r"model/rows: the saved pieces cover 3 of the 6 elements"):
        plan_reads(entry, Box((1, 0), (2, 3)))


def test_a_rank_whose_save_fails_tells_rank_0_which_gives_the_commit_up_at_once(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    _run_two_ranks("fail-rank1", root, tmp_path)  # commit_timeout_s is 600: waiting would time out
    assert not (root / "step-000000003" / "manifest.json").exists()


def test_a_uri_that_is_not_shared_by_all_ranks_is_a_clear_error_on_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "local"
    _run_two_ranks("unshared", root, tmp_path)  # asserts the message on both ranks
    leftovers = [p.name for d in tmp_path.glob("local*") for p in d.iterdir()]
    assert leftovers == [], leftovers  # rank 0's probe files are gone, on the mirror too


def test_a_rank_that_cannot_look_at_the_uri_fails_construction_on_every_rank_without_a_hang(
    tmp_path: Path,
) -> None:
    _run_two_ranks("probe-error", tmp_path / "ck", tmp_path)  # a hang would time out after 120 s


def test_a_rank_that_cannot_list_the_checkpoints_fails_the_load_on_every_rank_without_a_hang(
    tmp_path: Path,
) -> None:
    _run_two_ranks("list-error", tmp_path / "ck", tmp_path)  # a hang would time out after 120 s


def test_rank_0_makes_the_origin_id_even_where_its_own_memory_tier_is_off(tmp_path: Path) -> None:
    _run_two_ranks("origin", tmp_path / "ck", tmp_path)


def test_a_new_run_whose_rank_0_dies_while_saving_a_committed_step_leaves_it_whole(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ck"
    _run_two_ranks("rewrite-save", root, tmp_path)
    store = tmp_path / "store-rewrite-die"
    argv = [sys.executable, str(WORKER), "--mode", "rewrite-die", "--root", str(root), "--store", str(store)]
    (code0, out0), (code1, out1) = run_ranks([[*argv, "--rank", str(rank)] for rank in range(2)], timeout=120)
    assert code0 == 9 and code1 == 0, f"rank 0 ({code0}):\n{out0[-2000:]}\nrank 1 ({code1}):\n{out1[-2000:]}"
    assert "checkpoint step 10 is already committed in" in out1, out1[-2000:]
    _run_two_ranks("rewrite-load", root, tmp_path)  # step 10 of the first run, verified

    # FSDP2 on a TP mesh gives 2-D parameters (_StridedShard(0), Shard(0)); _StridedShard's
    # is_shard() is False, and taking it for a replica left half the rows unsaved
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.testing._internal.distributed.fake_pg import FakeStore  # torch's own no-op backend

    from stalwart.checkpoint.reshard import local_box, saves_piece

    # rank (dp, tp) on a 2 x 2 mesh: TP splits the 8 rows in two, FSDP splits each half again
    cases = {
        "fsdp+tp": ((_StridedShard(0, split_factor=2), Shard(0)), {0: 0, 1: 4, 2: 2, 3: 6}, 2, [0, 1, 2, 3]),
        "replicas": ((Replicate(), Shard(0)), {0: 0, 1: 4, 2: 0, 3: 4}, 4, [0, 1]),
    }
    for name, (placements, first_row, rows, savers) in cases.items():
        saved: list[int] = []
        for rank in range(4):
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
            try:
                piece = distribute_tensor(torch.zeros(8, 2), init_device_mesh("cpu", (2, 2)), placements)
                _, _, box = local_box(piece)
                assert box.offsets[0] == first_row[rank] and box.shape == (rows, 2), (name, rank)
                assert saves_piece(piece, rank) == (rank in savers), (name, rank)
                if rank in savers:
                    saved += range(box.offsets[0], box.offsets[0] + rows)
            finally:
                dist.destroy_process_group()
        assert sorted(saved) == list(range(8)), name  # every row once: no gap, no second copy


def test_a_rank_saving_the_same_step_again_waits_for_rank_0s_commit_of_the_first(tmp_path: Path) -> None:
    # rank 1's second write used to land under the checksums rank 0 was committing: step 3
    # committed with a shard that failed them
    _run_two_ranks("same-step-twice", tmp_path / "ck", tmp_path)  # both ranks load step 3


def test_a_rank_saving_a_step_again_does_not_wait_for_a_commit_rank_0_gave_up(tmp_path: Path) -> None:
    # rank 0 leaves a note when it gives an attempt up; waiting for the manifest took 600 s
    _run_two_ranks("gave-up", tmp_path / "ck", tmp_path)  # 120 s limit
