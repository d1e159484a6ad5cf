"""Running the ranks of a small gloo job as separate processes (the 2-rank checkpoint tests)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[2]


def run_ranks(argvs: list[list[str]], timeout: float = 180) -> list[tuple[int, str]]:
    """Start one process per argv (one per rank, each in a session of its own), wait for all of
    them, kill whatever is left after ``timeout``; each one's exit status and output."""
    procs = [
        subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        for argv in argvs
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]
