"""A tiny data-parallel training loop for agent tests (gloo, CPU).

Each step all-reduces the gradients of a small linear model, calls ``stalwart.worker.report``, and
rank 0 saves ``{step, model}`` to ``--ckpt`` atomically. On start it resumes from the checkpoint, so
a restarted generation continues past the step where the previous one crashed.

Every rank appends ``GEN STEP`` lines to ``--progress-dir/rank-R.txt`` so tests can check progress.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from stalwart.worker import report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--progress-dir", required=True)
    ap.add_argument("--step-time", type=float, default=0.0)
    ap.add_argument("--exit-code", type=int, default=0, help="exit with this code after training")
    ap.add_argument(
        "--exit-on-error",
        action="store_true",
        help="a failed collective ends the worker at once (os._exit(1)), as a script's own handler may",
    )
    args = ap.parse_args()
    if not args.exit_on_error:
        train(args)
        return
    try:
        train(args)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def train(args: argparse.Namespace) -> None:

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = int(os.environ.get("STALWART_GENERATION", "0"))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = 0
    if os.path.exists(args.ckpt):
        state = torch.load(args.ckpt)
        model.load_state_dict(state["model"])
        start = state["step"]
    os.makedirs(args.progress_dir, exist_ok=True)
    progress = open(os.path.join(args.progress_dir, f"rank-{rank}.txt"), "a")  # noqa: SIM115
    print(f"rank {rank}/{world} generation {gen} resuming at step {start}", flush=True)
    g = torch.Generator().manual_seed(rank)
    for step in range(start + 1, args.steps + 1):
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        if args.step_time:
            time.sleep(args.step_time)
        if rank == 0:
            tmp = args.ckpt + ".tmp"
            torch.save({"step": step, "model": model.state_dict()}, tmp)
            os.replace(tmp, args.ckpt)
        dist.barrier()  # the checkpoint of `step` exists before any rank reports it
        report(step, loss=loss.item())
        progress.write(f"{gen} {step}\n")
        progress.flush()
        print(f"step {step} loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()
    progress.close()
    sys.stdout.flush()
    # gloo's threads sometimes abort the interpreter's C++ teardown ("terminate called without an
    # active exception", SIGABRT), after the last step: a failure these tests did not inject
    os._exit(args.exit_code)


if __name__ == "__main__":
    main()
