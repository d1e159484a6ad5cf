"""A tiny worker for health tests: steps of ``--step-time`` seconds, each reported and printed.

It registers ``faulthandler`` on the stack-dump signal the way stalwart's bootstrap does, so the
hang monitor can ask it for its stacks. Faults come from ``STALWART_FAULT`` (``stalwart.worker``).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import sys
import time

from stalwart.worker import report
from stalwart.worker.api import ENV_FAULT, ENV_STACK_DIR, STACK_DUMP_SIGNAL, stack_dump_path
from stalwart.worker.faults import parse_faults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--step-time", type=float, default=0.05)
    ap.add_argument("--noise", type=float, default=0.0, help="uniform relative noise on the step time")
    ap.add_argument("--loss", type=float, default=2.0)
    ap.add_argument("--no-report", action="store_true", help="only print the loss")
    ap.add_argument("--print-every", type=int, default=1)
    args = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    stack_dir = os.environ.get(ENV_STACK_DIR)
    if stack_dir:
        os.makedirs(stack_dir, exist_ok=True)
        dump = open(stack_dump_path(stack_dir, rank, os.getpid()), "a")  # noqa: SIM115 - lives as long as the process
        faulthandler.register(STACK_DUMP_SIGNAL, file=dump, all_threads=True)
    rng = random.Random(rank)
    printed_nan = [
        f for f in parse_faults(os.environ.get(ENV_FAULT, "")) if f.kind == "nan" and f.rank == rank
    ]
    print(f"rank {rank} starting", flush=True)
    for step in range(1, args.steps + 1):
        time.sleep(args.step_time * (1 + args.noise * (2 * rng.random() - 1)))
        loss = args.loss * (1 + 0.01 * rng.random())
        if not args.no_report:
            loss = report(step, loss=loss)
        elif any(step >= f.step for f in printed_nan):  # a script that only prints its loss
            loss = float("nan")
        if step % args.print_every == 0:
            print(f"step {step} loss: {loss:.4f}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
