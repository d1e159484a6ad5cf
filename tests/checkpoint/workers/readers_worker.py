"""One rank of a 2-rank gloo DDP job: saves replicated state, or loads it and reports the bytes
this process read from storage during the load (``/proc/self/io``; see test_io_paths.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from stalwart.checkpoint import CheckpointConfig, Checkpointer

TENSOR_BYTES = 24 << 20


def replicated_state(seed: int) -> dict[str, torch.Tensor]:
    """What DDP keeps on every rank: the same tensors, saved once (in rank 0's file)."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(TENSOR_BYTES // 4, generator=g), "b": torch.randn(4096, generator=g)}


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["save", "load"], required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=2)
    ck = Checkpointer(args.root, CheckpointConfig(memory_tier=False, flush_on_sigterm=False))
    if args.mode == "save":
        ck.save(5, replicated_state(5), blocking=True)
        report: dict = {}
    else:
        target = {k: torch.zeros_like(v) for k, v in replicated_state(0).items()}
        dist.barrier()
        before = _read_bytes()
        step = ck.load_latest(target)
        read = _read_bytes() - before
        exact = all(torch.equal(target[k], v) for k, v in replicated_state(5).items())
        report = {"step": step, "read_bytes": read, "exact": exact}
    ck.close()
    print(json.dumps({"rank": args.rank, **report}), flush=True)
    dist.barrier()
    sys.stdout.flush()
    # gloo's threads can abort C++ teardown at interpreter exit: leave at once
    os._exit(0)


if __name__ == "__main__":
    main()
