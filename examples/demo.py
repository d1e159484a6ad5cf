"""``make demo``: two simulated nodes x 2 workers on 127.0.0.1, a crash, the recovery, the result.

1. Starts two ``stalwart run`` agents (nodes ``node0`` and ``node1``) that meet through a c10d
   rendezvous on 127.0.0.1 (node0 hosts the store) and train ``examples/train.py`` on 4 ranks.
2. ``--fault crash:rank=3:step=35`` makes global rank 3 (on node1) SIGKILL itself after step 35;
   both agents restart their workers, which resume from the step-30 checkpoint.
3. Prints the recovery timeline (``stalwart events runs/demo``) and the final loss, then trains the
   same job once more without the fault and checks that both final losses are identical.

Logs, events and checkpoints go under ``runs/demo/``. Every process started here is stopped on
exit, on an error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "demo"
TRAIN = str(ROOT / "examples" / "train.py")
STALWART = str(Path(sys.executable).parent / "stalwart")
STEPS, CKPT_EVERY, CRASH_STEP, CRASH_RANK = 60, 10, 35, 3
TRAIN_ARGS = ["--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), "--seed", "1", "--step-time", "0.05"]
RE_FINAL = re.compile(r"done steps \d+ final_loss (\S+)")

_procs: list[subprocess.Popen] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SHOWN = re.compile(
    r"started rank|injecting fault|done steps|\[stalwart (?!WARNING)[^\]]*\] (?!recovery timeline)|step (\d+) loss"
)


def _shown(line: str) -> bool:
    """The lines worth a demo's screen: agents' messages, every 10th step, start/fault/done."""
    m = _SHOWN.search(line)
    return m is not None and (m.group(1) is None or int(m.group(1)) % 10 == 0)


def _start(name: str, cmd: list[str], log: Path, out: list[str]) -> subprocess.Popen:
    """Start ``cmd`` in its own session; keep its output, log it to ``log`` and echo the
    interesting lines prefixed with ``name``."""
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"},
        cwd=ROOT,
        start_new_session=True,
    )
    _procs.append(p)

    def pump() -> None:
        assert p.stdout is not None
        with open(log, "w") as f:
            for line in p.stdout:
                f.write(line)
                out.append(line)
                if _shown(line):
                    print(f"[{name}] {line}", end="", flush=True)

    threading.Thread(target=pump, daemon=True).start()
    return p


def _stop_all() -> None:
    """Kill every process started here and all their descendants (workers run in own sessions)."""
    procs: list[psutil.Process] = []
    for p in _procs:
        if p.poll() is None:
            with contextlib.suppress(psutil.Error):
                procs += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for q in procs:
        with contextlib.suppress(psutil.Error):
            q.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for q in alive:
        with contextlib.suppress(psutil.Error):
            q.kill()
    psutil.wait_procs(alive, timeout=5)


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SystemExit(
                f"demo: a launcher did not finish within {timeout:.0f}s; logs in {RUNS}"
            ) from None
    return [p.returncode for p in procs]


def _final_loss(lines: list[str]) -> str | None:
    for line in reversed(lines):
        m = RE_FINAL.search(line)
        if m:
            return m.group(1)
    return None


def run_demo() -> int:
    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    port, job = _free_port(), f"demo-{uuid.uuid4().hex[:8]}"
    fault = f"crash:rank={CRASH_RANK}:step={CRASH_STEP}"
    print(f"== two nodes x 2 workers on 127.0.0.1:{port}; injecting {fault}", flush=True)
    print(
        f"   (every line is in {RUNS.relative_to(ROOT)}/node*.log; here: agents' messages and every 10th step)\n"
    )
    t0 = time.monotonic()
    out: list[str] = []
    agents = []
    for node in (0, 1):
        cmd = [
            STALWART, "run", "--nnodes=2", "--nproc-per-node=2", "--max-restarts=3",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}",
            f"--rdzv-conf=is_host={1 if node == 0 else 0}", f"--node-name=node{node}",
            f"--log-dir={RUNS}", f"--fault={fault}",
            TRAIN, *TRAIN_ARGS, "--ckpt-dir", str(RUNS / "ckpt"),
        ]  # fmt: skip
        agents.append(_start(f"node{node}", cmd, RUNS / f"node{node}.log", out))
    codes = _wait(agents, timeout=100)
    elapsed = time.monotonic() - t0
    if any(codes):
        print(f"\ndemo: the job failed (exit codes {codes}); logs in {RUNS}", flush=True)
        return 1
    final = _final_loss(out)

    print(f"\n== recovery timeline (stalwart events {RUNS.relative_to(ROOT)})\n", flush=True)
    subprocess.run([STALWART, "events", str(RUNS)], check=False, cwd=ROOT)

    print(
        "\n== the same job without the fault, for comparison (1 node x 4 workers, same ranks and seed)\n",
        flush=True,
    )
    ref_out: list[str] = []
    ref = _start(
        "reference",
        [STALWART, "run", "--standalone", "--nproc-per-node=4", "--no-standby", f"--log-dir={RUNS / 'reference'}",
         TRAIN, *TRAIN_ARGS, "--ckpt-dir", str(RUNS / "ckpt-reference")],
        RUNS / "reference.log",
        ref_out,
    )  # fmt: skip
    _wait([ref], timeout=100)
    reference = _final_loss(ref_out)

    print(f"\n== result: trained {STEPS} steps through a crash of rank {CRASH_RANK} in {elapsed:.1f}s")
    print(f"   final loss with the crash:    {final}")
    print(f"   final loss without the crash: {reference}")
    if final is not None and final == reference:
        print(
            "   identical: the restarted workers resumed from the step-30 checkpoint and replayed the same batches."
        )
        return 0
    print(
        "   they differ: the resumed run should replay exactly the same batches from the checkpoint; "
        f"see {RUNS}/node*.log and the timeline above."
    )
    return 1


def main() -> int:
    # Ctrl-C and SIGTERM unwind through the finally below, which stops every process we started.
    # (SIGINT explicitly: a shell starts background jobs with SIGINT ignored.)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        return run_demo()
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        _stop_all()


if __name__ == "__main__":
    sys.exit(main())
