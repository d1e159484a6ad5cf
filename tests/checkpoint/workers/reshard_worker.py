"""One rank of a 2-rank gloo job that saves or loads DTensor-sharded state (see test_reshard.py)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from stalwart.checkpoint import CheckpointConfig, Checkpointer
from stalwart.checkpoint.storage_posix import PosixStorage
from stalwart.errors import CheckpointError, ConfigError


def full_state() -> dict:
    """The global tensors every test expects, identical on every rank."""
    return {
        "rows": torch.arange(15, dtype=torch.float32).reshape(5, 3),  # uneven: 3 + 2 rows
        "cols": torch.arange(24, dtype=torch.int64).reshape(4, 6),
        "repl": torch.linspace(0, 1, 7),
    }


def _exit() -> None:
    """Exit at once once the work is checked: gloo's threads can abort C++ teardown at interpreter
    exit ("terminate called without an active exception"), which is not what these tests test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class FullDisk(PosixStorage):
    """Rank 1's view of a disk that is full: its shard cannot be written."""

    def write(self, path: str, buffers: Sequence[memoryview]) -> None:
        raise CheckpointError(f"disk full while writing {path}: free space there or keep fewer checkpoints")


def fail_rank1(root: str, rank: int) -> None:
    """Rank 1's save fails; rank 0 must give the commit up at once (not after commit_timeout_s)."""
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False, commit_timeout_s=600)
    storage = FullDisk(root) if rank == 1 else PosixStorage(root)
    ck = Checkpointer(root, config, storage=storage)
    result = ck.save(3, {"w": torch.ones(8), "rank_state": {"r": torch.tensor([rank])}}).result()
    assert result is None, result
    if rank == 0:
        assert "rank 1 could not save its part: disk full" in str(ck.last_error), ck.last_error
    dist.barrier()  # training goes on: the next collective is reached by both ranks
    ck.close()
    dist.destroy_process_group()
    _exit()


class Forbidden(PosixStorage):
    """Rank 1's view of a location it may write but not look at (wrong credentials, say)."""

    def exists(self, path: str) -> bool:
        raise PermissionError(f"access denied to {path}")


def probe_error(root: str, rank: int) -> None:
    """Rank 1 cannot even look at the URI: both ranks get the error, neither hangs."""
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
    storage = Forbidden(root) if rank == 1 else PosixStorage(root)
    try:
        Checkpointer(root, config, storage=storage)
    except ConfigError as exc:
        message = str(exc)
        assert "is not shared by all ranks: rank 1 cannot see" in message, message
        assert ("access denied" in message) == (rank == 1), message
    else:
        raise AssertionError("a URI rank 1 cannot look at was accepted")
    dist.barrier()
    dist.destroy_process_group()
    _exit()


class Unlistable(PosixStorage):
    """Rank 1's view of a location whose listing fails (a network file system's hiccup)."""

    def list(self, prefix: str = "") -> list[str]:
        raise OSError(5, "Input/output error", self.root)


def list_error(root: str, rank: int) -> None:
    """Rank 1 cannot list the checkpoints in load_latest: both ranks raise, neither hangs."""
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
    ck = Checkpointer(root, config, storage=Unlistable(root) if rank == 1 else PosixStorage(root))
    try:
        ck.load_latest({"w": torch.zeros(8)})
    except CheckpointError as exc:
        message = str(exc)
        assert f"cannot list the checkpoints in {root}" in message, message
        assert ("Input/output error" in message) == (rank == 1), message
    else:
        raise AssertionError("load_latest went on without rank 1's listing")
    ck.close()
    dist.barrier()
    dist.destroy_process_group()
    _exit()


def unshared(root: str, rank: int) -> None:
    """Each rank's URI is its own directory, as node-local disks would be: construction fails."""
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
    try:
        Checkpointer(f"{root}-{rank}", config, mirrors=[f"{root}-shared-mirror"])
    except ConfigError as exc:
        message = str(exc)
        assert f"location {root}-{rank} is not shared by all ranks: rank 1 cannot see" in message, message
        assert "FSx for Lustre" in message, message
    else:
        raise AssertionError("a URI that is not shared was accepted")
    dist.barrier()  # both ranks raised, neither hangs in a collective
    dist.destroy_process_group()
    _exit()


class DiesAtTheManifest(PosixStorage):
    """Rank 0's storage in a new run: rank 0 dies as it looks at step 10's manifest (a crash,
    a lost node)."""

    def exists(self, path: str) -> bool:
        if path.endswith("manifest.json"):
            os._exit(9)
        return super().exists(path)


def rewrite_state(rank: int, run: int) -> dict:
    return {
        "w": torch.full((1 << 10,), float(run)),
        "rank_state": {"r": torch.full((1 << 10,), 10.0 * run + rank)},
    }


def rewrite(root: str, rank: int, phase: str) -> None:
    """An earlier run commits step 10 (phase "save"); a new run that never loads saves step 10,
    and its rank 0 dies ("die"): rank 1 must not overwrite its shard of the committed step,
    which still loads whole ("load")."""
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False, commit_timeout_s=3)
    if phase == "save":
        ck = Checkpointer(root, config)
        assert ck.save(10, rewrite_state(rank, 1), blocking=True).result() is not None
    elif phase == "die":
        ck = Checkpointer(root, config, storage=DiesAtTheManifest(root) if rank == 0 else PosixStorage(root))
        assert ck.save(10, rewrite_state(rank, 2)).result() is None  # rank 1: declined
        _exit()  # no collective: rank 0 is gone
    else:
        ck = Checkpointer(root, config)
        target = rewrite_state(rank, 0)
        assert ck.load_latest(target) == 10
        for got, want in zip(target.values(), rewrite_state(rank, 1).values(), strict=True):
            assert torch.equal(
                got if isinstance(got, torch.Tensor) else got["r"],
                want if isinstance(want, torch.Tensor) else want["r"],
            )
    ck.close()
    dist.barrier()
    dist.destroy_process_group()
    _exit()


def origin_without_rank0_memory(root: str, rank: int) -> None:
    """Rank 0's node cannot use its memory tier (its shm_root is not a directory), rank 1's can:
    rank 0 still makes the location's origin id, so rank 1's snapshots record it (and rank 1
    does not wait for it at every save)."""
    shm = os.path.join(os.path.dirname(root), f"shm-{rank}")
    if rank == 0:
        with open(shm, "w"):  # a file: the memory tier is off on this rank
            pass
    config = CheckpointConfig(shm_root=shm, job="origin", flush_on_sigterm=False)
    ck = Checkpointer(root, config)
    assert (ck.memory is None) == (rank == 0)
    for step in (1, 2):
        assert ck.save(step, {"w": torch.ones(64)}, blocking=True).result() is not None
    with open(os.path.join(root, "stalwart-origin")) as f:
        origin = f.read().strip()
    if ck.memory is not None:
        latest = ck.memory.latest()
        assert latest is not None and latest[1].origin == origin, latest
    ck.close(drop_memory=True)
    dist.barrier()
    dist.destroy_process_group()
    _exit()


class HeldCommit(PosixStorage):
    """Rank 0's storage: the first manifest waits until rank 1 has started its second save."""

    def __init__(self, root: str, go: str) -> None:
        super().__init__(root)
        self.go = go

    def write_atomic(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        if path.endswith("manifest.json"):
            deadline = time.monotonic() + 60
            while not os.path.exists(self.go) and time.monotonic() < deadline:
                time.sleep(0.01)
        super().write_atomic(path, data, exclusive=exclusive)


class FailsOnce(PosixStorage):
    """Rank 0's storage: its first shard write fails (rank 0 gives that save up)."""

    failed = False

    def write(self, path: str, buffers: Sequence[memoryview], **kw: object) -> None:
        if path.endswith(".safetensors") and not self.failed:
            self.failed = True
            raise CheckpointError(f"disk full while writing {path}")
        super().write(path, buffers, **kw)  # type: ignore[arg-type]


def same_step_after_rank0_gave_up(root: str, rank: int) -> None:
    """Rank 0 gives step 3 up; rank 1, whose part was published, saves step 3 again at once
    instead of waiting commit_timeout_s (600 s) for a manifest that never comes."""
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False, commit_timeout_s=600)
    ck = Checkpointer(root, config, storage=FailsOnce(root) if rank == 0 else PosixStorage(root))
    state = {"w": torch.ones(8), "rank_state": {"r": torch.full((1 << 12,), float(rank))}}
    first = ck.save(3, state).result()
    assert (first is None) == (rank == 0), first  # rank 1 published; rank 0 gave up
    dist.barrier()
    assert ck.save(3, state).result() is not None
    ck.wait()
    dist.barrier()
    target = {"w": torch.zeros(8), "rank_state": {"r": torch.zeros(1 << 12)}}
    assert ck.load_latest(target) == 3
    ck.close()
    dist.destroy_process_group()
    _exit()


def same_step_twice(root: str, rank: int) -> None:
    """Both ranks save step 3, then rank 1 saves step 3 again with other bytes while rank 0 is
    still committing the first save: rank 1 must not write under the first save's checksums."""
    go = os.path.join(os.path.dirname(root), "rank1-saved-again")
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
    ck = Checkpointer(root, config, storage=HeldCommit(root, go) if rank == 0 else PosixStorage(root))

    def state(version: int) -> dict:
        return {"w": torch.ones(8), "rank_state": {"r": torch.full((1 << 16,), float(10 * rank + version))}}

    first = ck.save(3, state(1))
    if rank == 1:
        first.result()  # its part is published; rank 0's commit is held
        ck.save(3, state(2))  # the final save of the same step, with other bytes
        open(go, "w").close()
    else:
        ck.save(3, state(2))
    ck.wait()
    dist.barrier()
    target = {"w": torch.zeros(8), "rank_state": {"r": torch.zeros(1 << 16)}}
    assert ck.load_latest(target) == 3  # verified: every file is what the manifest says
    assert float(target["rank_state"]["r"][0]) == 10 * rank + 1, target["rank_state"]["r"][0]
    ck.close()
    dist.destroy_process_group()
    _exit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode",
        choices=[
            "save",
            "load",
            "load-same",
            "load-strict",
            "fail-rank1",
            "unshared",
            "probe-error",
            "list-error",
            "origin",
            "rewrite-save",
            "rewrite-die",
            "rewrite-load",
            "same-step-twice",
            "gave-up",
        ],
        required=True,
    )
    parser.add_argument("--shm", default=None, help="enable the memory tier under this root")
    parser.add_argument("--root", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--mirror", default=None, help="also keep checkpoints in this mirror")
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    full = full_state()

    def sharded(rows: torch.Tensor, cols: torch.Tensor, repl: torch.Tensor) -> dict:
        return {
            "model": {
                "rows": distribute_tensor(rows, mesh, [Shard(0)]),
                "cols": distribute_tensor(cols, mesh, [Shard(1)]),
                "repl": repl,
            },
            "rank_state": {"rng": torch.tensor([100 + args.rank])},
            "step": 0,
        }

    config = CheckpointConfig(
        memory_tier=args.shm is not None,
        shm_root=args.shm or "/dev/shm",
        job="reshard",
        rank_state_on_resize="error" if args.mode == "load-strict" else "remap",
    )
    alone = {
        "fail-rank1": fail_rank1,
        "unshared": unshared,
        "probe-error": probe_error,
        "list-error": list_error,
        "same-step-twice": same_step_twice,
        "gave-up": same_step_after_rank0_gave_up,
        "origin": origin_without_rank0_memory,
        "rewrite-save": lambda root, rank: rewrite(root, rank, "save"),
        "rewrite-die": lambda root, rank: rewrite(root, rank, "die"),
        "rewrite-load": lambda root, rank: rewrite(root, rank, "load"),
    }
    if args.mode in alone:
        alone[args.mode](args.root, args.rank)
        return
    ck = Checkpointer(args.root, config, mirrors=[args.mirror] if args.mirror else [])
    if args.mode == "save":
        state = sharded(full["rows"], full["cols"], full["repl"])
        state["step"] = 7
        ck.save(7, state, blocking=True)
        ck.wait()  # and the mirror's copy
    elif args.mode == "load-strict":  # saved by one rank: its rank_state cannot be split in two
        state = sharded(torch.zeros(5, 3), torch.zeros(4, 6, dtype=torch.int64), torch.zeros(7))
        try:
            ck.load_latest(state)
        except CheckpointError as exc:
            assert "saved by 1 ranks and is loaded by 2" in str(exc), exc
            assert "rank_state_on_resize='remap'" in str(exc), exc
        else:
            raise AssertionError("a checkpoint of 1 rank's rank_state loaded on 2 ranks")
        assert state["rank_state"]["rng"].item() == 100 + args.rank  # untouched
    else:
        state = sharded(torch.zeros(5, 3), torch.zeros(4, 6, dtype=torch.int64), torch.zeros(7))
        step = ck.load_latest(state)
        assert step == 7, step
        assert torch.equal(state["model"]["rows"].full_tensor(), full["rows"])
        assert torch.equal(state["model"]["cols"].full_tensor(), full["cols"])
        assert torch.equal(state["model"]["repl"], full["repl"])
        # saved by one rank, every rank gets rank 0's per-rank state (rank % saved world size);
        # saved by two, each rank gets its own
        expected = 100 + args.rank if args.mode == "load-same" else 100
        assert state["rank_state"]["rng"].item() == expected, state["rank_state"]["rng"]
        assert state["step"] == 7
    ck.close()
    dist.barrier()
    dist.destroy_process_group()
    _exit()


if __name__ == "__main__":
    main()
