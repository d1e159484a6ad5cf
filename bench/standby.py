"""Warm standby vs fresh worker start: seconds from ``StandbyPool.launch`` to points in the script.

Scenarios (each run ``--reps`` times, medians reported, all in one run so the reference shares the
machine's load):

- ``first_line``: launch to the script's first line.
- ``imports_done``: launch to the line after ``import torch, torch.distributed, torch._dynamo``.
- ``ddp_first_step``: two ranks (gloo on 127.0.0.1): launch to the later rank finishing
  ``init_process_group`` + DDP construction + one optimizer step. With standbys this is measured with
  the default ``refill_delay`` (1 s) and with the pool refilling at once, to show what the refill's
  imports cost the new workers when they share the CPUs.

Usage: ``python bench/standby.py [--reps 5]``. Writes ``bench/results/standby.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from stalwart.agent.standby import LaunchSpec, StandbyPool

SCRIPTS = {
    "first_line": "import time\nprint(time.time(), flush=True)\n",
    "imports_done": (
        "import time\nimport torch, torch.distributed, torch._dynamo\nprint(time.time(), flush=True)\n"
    ),
    "ddp_first_step": """\
import os
import time
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(256, 256))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.randn(32, 256)).sum().backward()
opt.step()
print(time.time(), flush=True)
# Not destroy_process_group() and a normal exit: gloo sometimes aborts at exit ("terminate called
# without an active exception"), with plain python as well; the timestamp is all we need.
os._exit(0)
""",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("standbys did not become ready")
        time.sleep(0.05)


def _one(pool: StandbyPool, scenario: str, workdir: str, env: dict[str, str]) -> float:
    """One launch of ``scenario``; returns seconds from launch to the slowest rank's timestamp."""
    ranks = 2 if scenario == "ddp_first_step" else 1
    port = str(_free_port())
    t0 = time.time()
    procs = []
    for rank in range(ranks):
        renv = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks)}
        renv.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(pool.launch(LaunchSpec(f"{scenario}.py", (), renv, workdir)))
    stamps = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"{scenario} failed ({p.returncode}): {err.decode()[-2000:]}")
        stamps.append(float(out.split()[0]))
    return max(stamps) - t0


def run(reps: int) -> dict[str, object]:
    workdir = tempfile.mkdtemp(prefix="stalwart-bench-standby-")
    for name, body in SCRIPTS.items():
        Path(workdir, f"{name}.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STALWART_", "TORCHELASTIC_"))}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    results: dict[str, dict[str, list[float]]] = {}
    rss_mb = 0.0
    configs = [("fresh", 0, 0.0), ("standby", 2, 1.0), ("standby_refill_at_once", 2, 0.0)]
    for scenario in SCRIPTS:
        results[scenario] = {}
        for label, size, delay in configs:
            if label == "standby_refill_at_once" and scenario != "ddp_first_step":
                continue
            times = []
            with StandbyPool(size, env=env, refill_delay=delay) as pool:
                for _ in range(reps):
                    if size:
                        _wait(lambda p=pool, n=size: p.ready_count() == n)
                        if not rss_mb:
                            kids = psutil.Process().children()
                            rss_mb = max(k.memory_info().rss for k in kids) / 2**20
                    times.append(_one(pool, scenario, workdir, env))
            results[scenario][label] = times
            print(f"{scenario:15s} {label:24s} median {statistics.median(times):.3f}s  {times}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "reps": reps,
        "cpus": os.cpu_count(),
        "torch": __import__("torch").__version__,
        "standby_rss_mb": round(rss_mb, 1),
        "seconds": results,
        "median": {s: {k: statistics.median(v) for k, v in r.items()} for s, r in results.items()},
    }


def to_markdown(res: dict[str, object]) -> str:
    median: dict[str, dict[str, float]] = res["median"]  # type: ignore[assignment]
    lines = [
        f"Launch to a point in the script, median of {res['reps']} (seconds; {res['cpus']} CPUs, "
        f"torch {res['torch']}; a ready standby holds {res['standby_rss_mb']} MB RSS).",
        "",
        "| scenario | fresh | standby | speed-up | standby, refill at once | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, m in median.items():
        fresh, warm = m["fresh"], m["standby"]
        at_once = m.get("standby_refill_at_once")
        tail = f"{at_once:.3f} | {fresh / at_once:.1f}x" if at_once else "- | -"
        lines.append(f"| {scenario} | {fresh:.3f} | {warm:.3f} | {fresh / warm:.1f}x | {tail} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    res = run(args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "standby.json").write_text(json.dumps(res, indent=2) + "\n")
    md = to_markdown(res)
    (out / "standby.md").write_text(md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
