"""The monitors inside the real agent: ``stalwart run`` of a gloo DDP job with injected faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

StalwartRunner = Any  # the ``stalwart`` fixture's type (tests/conftest.py)


def test_a_nan_loss_and_a_hang_holding_the_gil_are_caught_and_recovered(stalwart: StalwartRunner) -> None:
    # One job, two incidents (one restart each): rank 0's loss turns NaN at step 6; after the restart
    # (from step 5 or 6) rank 1 blocks holding the GIL at step 10, so DDP stalls on both ranks.
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--node-name",
        "n0",
        "--fault",
        "nan:rank=0:step=6,hang_gil:rank=1:step=10",
        *stalwart.tiny_args(12, "--step-time", "0.1"),
    )
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    faults = [e for e in stalwart.events() if e["event"] == "fault"]
    assert [(e["generation"], e["fault"]["kind"]) for e in faults] == [(0, "loss_nan"), (1, "hang")]
    nan, hang = faults[0]["fault"], faults[1]["fault"]
    assert nan["rank"] == 0 and nan["evidence"]["step"] == 6 and nan["action"] == "restart"
    assert hang["action"] == "restart" and hang["evidence"]["mode"] == "reports"
    stacks = Path(hang["evidence"]["workers"]["1"]["stacks"])
    assert stacks.is_relative_to(stalwart.log_dir) and "_fire" in stacks.read_text()  # where it hangs
    assert Path(hang["evidence"]["workers"]["0"]["stacks"]).exists()  # every worker is dumped
    assert [s for g, s in stalwart.progress_of(1) if g == 2][-1] == 12  # the job finished after both
    ev = subprocess.run(
        [sys.executable, "-m", "stalwart.cli", "events", str(stalwart.log_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ev.returncode == 0 and "hang" in ev.stdout
