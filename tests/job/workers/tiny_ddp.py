"""A tiny gloo all-reduce loop for job tests: ``tiny_ddp.py --steps N``; reports every step."""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from stalwart.worker import report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-time", type=float, default=0.05)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    print(f"start rank={rank} world={world} restart={gen}", flush=True)
    for step in range(1, args.steps + 1):
        t = torch.tensor([float(rank + step)])
        dist.all_reduce(t)
        loss = report(step, loss=float(t.item()) / world)
        print(f"step {step} loss {loss:.3f}", flush=True)
        time.sleep(args.step_time)  # the "training" work of one step
    dist.barrier()
    print(f"done rank={rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
