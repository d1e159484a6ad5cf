"""A small DDP training script that survives restarts: run it under ``stalwart run`` or ``torchrun``.

    stalwart run --nproc-per-node 2 examples/train.py --steps 100 --ckpt-dir /tmp/ckpt

- gloo on CPU, NCCL when CUDA is available;
- deterministic for a given ``--seed``: the model is initialised from the seed and every batch
  comes from a generator keyed by (seed, step, rank), so a resumed run computes what an
  uninterrupted one would have;
- resumable: rank 0 saves a checkpoint with ``stalwart.checkpoint`` every ``--ckpt-every`` steps
  (``<ckpt-dir>/step-N/``: safetensors and a checksummed manifest committed last; ``--ckpt-dir`` may
  be a path or an ``s3://`` URI); on start every rank loads the newest verified one and continues
  after its step (``--ckpt-dir`` must be shared storage when nodes are separate machines);
- calls ``stalwart.worker.report(step, loss=...)`` every step (progress for the agent's monitors,
  and where ``STALWART_FAULT`` injects faults), and rank 0 prints ``step N loss X`` with the value
  ``report`` returns, the worker's wall clock and its restart generation.

Output lines (rank 0 unless noted)::

    started rank R pid P gen G resume_step S      (every rank)
    step N loss X t WALLCLOCK gen G
    timing gen G main T pg T setup T ckpt T ddp T first_step T   (wall clocks, a generation's first step)
    done steps N final_loss REPR
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stalwart.checkpoint import CheckpointConfig, Checkpointer, env_mirrors
from stalwart.worker import report

IN_DIM, OUT_DIM, BATCH = 32, 8, 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--steps", type=int, default=100, help="train until this step (steps count from 1)")
    p.add_argument(
        "--ckpt-dir",
        default=os.environ.get("STALWART_CHECKPOINT_URI", ""),
        help="checkpoint location (default: the job spec's checkpoint.uri); empty: no checkpoints",
    )
    p.add_argument("--ckpt-every", type=int, default=10, help="save every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--step-time", type=float, default=0.0, help="sleep this long per step (simulated compute)"
    )
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
    p.add_argument("--pg-timeout", type=float, default=60.0, help="process-group timeout, seconds")
    args = p.parse_args(argv)
    if args.steps < 1 or args.ckpt_every < 1 or args.hidden < 1:
        p.error("--steps, --ckpt-every and --hidden must be >= 1")
    return args


def save_checkpoint(ckpt_dir: str, state: dict[str, Any]) -> None:
    """Save ``state`` with ``stalwart.checkpoint`` (rank 0 alone: the DDP state is replicated).

    ``step-<N>/`` gets a safetensors shard and a manifest committed last; the last 3 are kept.
    The save is blocking so that a crash right after step N always resumes from N (the tests
    compare resume steps exactly); a long-lived ``Checkpointer`` whose ``save`` is not blocking
    persists in the background instead.
    """
    config = CheckpointConfig(keep_last=3, memory_tier=False, flush_on_sigterm=False)
    saver = Checkpointer(ckpt_dir, config, distributed=False, mirrors=env_mirrors())
    try:
        saver.save(int(state["step"]), state, blocking=True)
    finally:
        saver.close()


def load_checkpoint(ckpt_dir: str) -> dict[str, Any] | None:
    """The newest complete, verified checkpoint (every rank agrees on it), or None when there is none."""
    if not ckpt_dir:
        return None
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
    loader = Checkpointer(ckpt_dir, config, mirrors=env_mirrors())
    state: dict[str, Any] = {}
    try:
        step = loader.load_latest(state)
    finally:
        loader.close()
    return state if step is not None else None


def make_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, OUT_DIM)
    )


def batch(seed: int, step: int, rank: int, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``rank`` at ``step``: the same numbers however often the job restarted."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    y = torch.tanh(x @ teacher) + 0.01 * torch.randn(BATCH, OUT_DIM, generator=g)
    return x, y


def main(argv: list[str] | None = None) -> None:
    marks = {"main": time.time()}  # where a restart's time goes: see the timing line
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
    marks["pg"] = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = os.environ.get("STALWART_GENERATION", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = make_model(args.hidden, args.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    teacher = torch.randn(IN_DIM, OUT_DIM, generator=torch.Generator().manual_seed(args.seed + 1))
    marks["setup"] = time.time()
    start, loss_value = 1, float("nan")
    state = load_checkpoint(args.ckpt_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
        loss_value = state["loss"]
    marks["ckpt"] = time.time()
    print(f"started rank {rank} pid {os.getpid()} gen {gen} resume_step {start - 1}", flush=True)
    ddp = DistributedDataParallel(model)
    marks["ddp"] = time.time()

    for step in range(start, args.steps + 1):
        x, y = batch(args.seed, step, rank, teacher)
        loss = nn.functional.mse_loss(ddp(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        # the job's loss (mean over ranks), so every rank prints and reports the same number
        total = loss.detach().clone()
        dist.all_reduce(total)
        loss_value = report(step, loss=total.item() / world)
        if rank == 0:
            now = time.time()
            if step == start:
                print(
                    f"timing gen {gen} "
                    + " ".join(f"{k} {v:.4f}" for k, v in marks.items())
                    + f" first_step {now:.4f}"
                )
            print(f"step {step} loss {loss_value:.6f} t {now:.4f} gen {gen}", flush=True)
            if args.ckpt_dir and step % args.ckpt_every == 0:
                save_checkpoint(
                    args.ckpt_dir,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "step": step,
                        "loss": loss_value,
                    },
                )
        if args.step_time > 0:
            time.sleep(args.step_time)
    if rank == 0:
        print(f"done steps {args.steps} final_loss {loss_value!r}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
