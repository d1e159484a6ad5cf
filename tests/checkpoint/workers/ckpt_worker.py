"""A tiny trainer for fault tests: saves checkpoints, then dies or stalls the way a test asks.

--mode exit-after-save  save step 5 (blocking), then os._exit(0) with no cleanup
--mode hang-in-write    save step 1, then save step 2 whose shard write stalls half-way
--mode sigterm          save step 1 whose shard write waits for <marker>/go; SIGTERM flushes it
--mode sigterm-in-wait  the same, with the main thread inside ck.wait() when SIGTERM comes
--mode sigterm-in-save  the same, with the main thread inside save(2), waiting for save 1's slot
--mode sigterm-in-copy  SIGTERM arrives while save(1) copies the snapshot on the main thread
--mode sigterm-after-other-closed
                        as sigterm, after another Checkpointer made before this one was closed
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from stalwart.checkpoint import CheckpointConfig, Checkpointer, checkpointer
from stalwart.checkpoint.storage_posix import PosixStorage


class StallingStorage(PosixStorage):
    """Writes the first half of shard ``stall_step``, announces it, then waits for <marker>/go."""

    def __init__(self, root: str, marker: Path, stall_step: int) -> None:
        super().__init__(root)
        self.marker = marker
        self.stall = f"step-{stall_step:09d}/"

    def write(self, path: str, buffers: Sequence[memoryview]) -> None:
        if not path.startswith(self.stall):
            return super().write(path, buffers)
        data = b"".join(bytes(b) for b in buffers)
        os.makedirs(os.path.dirname(os.path.join(self.root, path)), exist_ok=True)
        with open(os.path.join(self.root, path), "wb") as f:
            f.write(data[: len(data) // 2])
        (self.marker / "writing").touch()
        deadline = time.monotonic() + 60
        while not (self.marker / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never said go")
            time.sleep(0.01)
        return super().write(path, buffers)


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(256, 256, generator=g)}, "step": seed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--shm", required=True)
    parser.add_argument("--marker", required=True, type=Path)
    modes = [
        "exit-after-save",
        "hang-in-write",
        "sigterm",
        "sigterm-in-wait",
        "sigterm-in-save",
        "sigterm-in-copy",
        "sigterm-after-other-closed",
    ]
    parser.add_argument("--mode", required=True, choices=modes)
    args = parser.parse_args()
    config = CheckpointConfig(shm_root=args.shm, job="worker", memory_tier=args.mode == "exit-after-save")
    if args.mode == "exit-after-save":
        ck = Checkpointer(args.root, config)
        ck.save(5, state(5), blocking=True)
        sys.stdout.flush()
        os._exit(0)
    stall = {"hang-in-write": 2, "sigterm-in-copy": 99}.get(args.mode, 1)
    other = Checkpointer(args.root + "-other", config) if args.mode == "sigterm-after-other-closed" else None
    ck = Checkpointer(args.root, config, storage=StallingStorage(args.root, args.marker, stall))
    if other is not None:
        other.close()  # its SIGTERM handler was installed first: ck's must stay
    if args.mode == "hang-in-write":
        ck.save(1, state(1), blocking=True)
        ck.save(2, state(2))
    elif args.mode == "sigterm-in-copy":
        copy = ck._snapshot

        def signalled_copy(*args: object) -> None:  # the handler runs on this thread, mid-copy
            os.kill(os.getpid(), signal.SIGTERM)
            copy(*args)  # type: ignore[arg-type]

        ck._snapshot = signalled_copy  # type: ignore[method-assign]
        ck.save(1, state(1))
    else:
        ck.save(1, state(1))
    if args.mode != "sigterm-in-save":
        (args.marker / "saved").touch()
    if args.mode == "sigterm-in-wait":
        ck.wait()
    elif args.mode == "sigterm-in-save":
        # save() says it is busy right before it waits for save 1's slot (max_in_flight=1)
        checkpointer.busy = lambda seconds: (args.marker / "waiting").touch()  # type: ignore[attr-defined]
        ck.save(2, state(2))
    while True:  # the training loop goes on until the test kills or signals it
        time.sleep(0.05)


if __name__ == "__main__":
    main()
