"""A worker that talks to no other worker: prints ``gen G step N`` every ``--step-time`` seconds
for ``--steps`` steps (``--gen0-steps`` in generation 0). Another node's restart then reaches
this node through its agent alone."""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--step-time", type=float, default=0.05)
    ap.add_argument("--gen0-steps", type=int, default=None)
    args = ap.parse_args()
    generation = os.environ["TORCHELASTIC_RESTART_COUNT"]
    steps = args.gen0_steps if generation == "0" and args.gen0_steps is not None else args.steps
    for step in range(1, steps + 1):
        print(f"gen {generation} step {step}", flush=True)
        time.sleep(args.step_time)


if __name__ == "__main__":
    main()
