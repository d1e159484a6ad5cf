"""Detection benchmark: seconds from an injected fault to the agent's verdict, per fault kind.

A 2-worker gloo job (this file with ``--worker``: a small all-reduce every step, ``report()`` with
the loss and the step's own compute time) runs under ``stalwart run`` with the health monitors at
their defaults. ``--fault`` injects one of: crash (SIGKILL), hang (GIL released), hang_gil (GIL
held in a C call), stop (SIGSTOP), nan (NaN loss) and slow (rank 1 twice as slow). Injection time
is the fault marker's timestamp (written by the worker as it fires); the verdict is the agent's
first ``fault`` event of the expected kind in ``events-*.jsonl``. The step time is the median
interval of rank 0's steps before the injection.

The same hung job under plain ``torchrun`` is detected only when the process-group timeout fires
(``--pg-timeout``; torch's default is 30 min for gloo and 10 min for NCCL); that comparison runs
too. A fault-free run with a noisy step time (``--quiet-seconds``) counts false alarms. The cost
of ``report()`` is measured against a bare ``sendto`` of the same bytes, in this process.

Each job runs in a network namespace with only ``lo`` up (torchrun's store binds the wildcard
address): needs root. Results: ``bench/results/detection.json`` and ``detection.md``.

    python bench/detection.py [--reps 5] [--faults crash,hang,...] [--quiet-seconds 600]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netns import loopback_netns

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"

# fault name -> (STALWART_FAULT spec, fault kinds that count as the verdict)
SCENARIOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "crash": ("crash:rank=1:step={step}", ("worker_exit",)),
    "hang": ("hang:rank=1:step={step}", ("hang",)),
    "hang_gil": ("hang_gil:rank=1:step={step}", ("hang",)),
    "stop": ("stop:rank=1:step={step}", ("hang",)),
    "nan": ("nan:rank=1:step={step}", ("loss_nan",)),
    "slow": ("slow:rank=1:step={step}:factor=2", ("straggler",)),
}


# -- the worker ------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from stalwart.worker import report

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
    rank = dist.get_rank()
    rng = random.Random(rank)
    log = open(os.path.join(args.progress_dir, f"rank-{rank}.txt"), "a")  # noqa: SIM115
    grad = torch.zeros(1024)
    after_collective = time.time()
    for step in range(1, args.steps + 1):
        time.sleep(args.step_time * (1 + args.noise * (2 * rng.random() - 1)))  # "compute"
        compute = time.time() - after_collective
        dist.all_reduce(grad)
        after_collective = time.time()
        loss = 2.0 + 0.01 * rng.random()
        report(step, loss=loss, step_time=compute)
        log.write(f"{step} {time.time():.6f}\n")
        log.flush()
    dist.destroy_process_group()


# -- running jobs ----------------------------------------------------------------------------------


def _worker_args(args: argparse.Namespace, progress: Path, steps: int, noise: float) -> list[str]:
    return [
        __file__,
        "--worker",
        "--steps",
        str(steps),
        "--step-time",
        str(args.step_time),
        "--noise",
        str(noise),
        "--pg-timeout",
        str(args.pg_timeout),
        "--progress-dir",
        str(progress),
    ]


def _start(cmd: list[str], ns: str, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _events(log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in glob.glob(str(log_dir / "events-*.jsonl")):
        with open(path) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def _injected_at(marker_dir: Path) -> float | None:
    for path in glob.glob(str(marker_dir / "fault-*")):
        text = Path(path).read_text()
        return float(text.rsplit("time=", 1)[1].split()[0])
    return None


def _step_time(progress: Path, before: float | None) -> float | None:
    try:
        rows = [line.split() for line in (progress / "rank-0.txt").read_text().splitlines()]
    except OSError:
        return None
    times = [float(t) for _, t in rows if before is None or float(t) <= before]
    gaps = [b - a for a, b in itertools.pairwise(times)][2:]  # skip warm-up
    return statistics.median(gaps) if gaps else None


def stalwart_run(
    args: argparse.Namespace,
    ns: str,
    work: Path,
    name: str,
    fault: str,
    kinds: tuple[str, ...],
    steps: int,
    noise: float,
    limit: float,
) -> dict[str, Any]:
    logs, progress, markers = work / "logs", work / "progress", work / "logs" / "faults"
    progress.mkdir(parents=True)
    cmd = [
        str(BIN / "stalwart"),
        "run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--log-dir",
        str(logs),
        "--max-restarts",
        "0",
        "--no-standby",
        *_worker_args(args, progress, steps, noise),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    if fault:
        env["STALWART_FAULT"] = fault
    proc = _start(cmd, ns, env, work / "out.txt")
    verdict: dict[str, Any] | None = None
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            faults = [e for e in _events(logs) if e.get("event") == "fault"]
            if fault and any(e["fault"]["kind"] in kinds for e in faults):
                verdict = next(e for e in faults if e["fault"]["kind"] in kinds)
                break
            time.sleep(0.1)
        time.sleep(0.3)
        faults = [e for e in _events(logs) if e.get("event") == "fault"]
    finally:
        _stop(proc)
    injected = _injected_at(markers)
    result: dict[str, Any] = {
        "scenario": name,
        "injected": injected is not None,
        "step_time_s": _step_time(progress, injected),
        "detected": verdict is not None,
        "latency_s": (verdict["time"] - injected) if verdict and injected else None,
        "verdict": verdict["fault"]["message"][:200] if verdict else None,
        "other_faults": [e["fault"]["kind"] for e in faults if e is not verdict],
    }
    if not fault:
        result["false_alarms"] = [e["fault"]["kind"] + ": " + e["fault"]["message"][:120] for e in faults]
    return result


def torchrun_hang(args: argparse.Namespace, ns: str, work: Path) -> dict[str, Any]:
    progress, markers = work / "progress", work / "markers"
    progress.mkdir(parents=True)
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--log-dir",
        str(work / "logs"),
        *_worker_args(args, progress, 10_000, 0.0),
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
        "STALWART_FAULT_MARKER_DIR": str(markers),
        "STALWART_FAULT": f"hang:rank=1:step={args.fault_step}",
    }
    proc = _start(cmd, ns, env, work / "out.txt")
    try:
        proc.wait(timeout=args.pg_timeout * 3 + 120)
    except subprocess.TimeoutExpired:
        pass
    ended = time.time()
    _stop(proc)
    injected = _injected_at(markers)
    return {
        "scenario": "hang (torchrun)",
        "pg_timeout_s": args.pg_timeout,
        "injected": injected is not None,
        "latency_s": ended - injected if injected else None,
        "step_time_s": _step_time(progress, injected),
    }


# -- report() cost ---------------------------------------------------------------------------------
def report_cost(reps: int = 5, n: int = 20000) -> dict[str, Any]:
    import importlib

    from stalwart.worker.api import Report

    report_mod = importlib.import_module("stalwart.worker.report")

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.sock")
        # A separate process drains the socket, like the agent: the sender never sees a full queue.
        drain = (
            "import socket\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n"
            f"s.bind({path!r})\nprint('ready',flush=True)\nwhile True: s.recv(65536)\n"
        )
        sink = subprocess.Popen([sys.executable, "-c", drain], stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        os.environ["STALWART_REPORT_SOCKET"] = path
        report_mod._sender.pid = -1  # re-read the environment
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        raw.setblocking(False)
        data = Report(rank=0, local_rank=0, step=1, time=time.time(), pid=1, loss=1.0).encode()
        ours: list[float] = []
        ref: list[float] = []
        try:
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(n):
                    report_mod.report(i, loss=1.0)
                ours.append((time.perf_counter() - t0) / n * 1e6)
                t0 = time.perf_counter()
                for _ in range(n):
                    with contextlib.suppress(OSError):
                        raw.sendto(data, path)
                ref.append((time.perf_counter() - t0) / n * 1e6)
        finally:
            sink.kill()
            sink.wait()
            raw.close()
    return {
        "report_us": statistics.median(ours),
        "sendto_us": statistics.median(ref),
        "ratio": statistics.median(ours) / statistics.median(ref),
        "runs_us": ours,
        "reference_runs_us": ref,
    }


# -- the benchmark ---------------------------------------------------------------------------------
def _median(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--step-time", type=float, default=0.25)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--pg-timeout", type=float, default=30.0)
    ap.add_argument("--progress-dir", default=".")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--faults", default=",".join(SCENARIOS))
    ap.add_argument("--fault-step", type=int, default=12)
    ap.add_argument("--torchrun-reps", type=int, default=2)
    ap.add_argument("--quiet-seconds", type=float, default=600.0, help="fault-free run length (0: skip)")
    ap.add_argument("--quiet-noise", type=float, default=0.3)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/detection.py needs root (it creates a network namespace with `ip netns`).")
    results: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "step_time_s": args.step_time,
        "runs": [],
        "report_cost": report_cost(),
    }
    print(
        f"report(): {results['report_cost']['report_us']:.2f} us/call "
        f"({results['report_cost']['ratio']:.2f}x a bare sendto)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="stalwart-det-") as tmp, loopback_netns("stalwart_det") as ns:
        work = Path(tmp)
        for rep in range(args.reps):
            for name in args.faults.split(","):
                spec, kinds = SCENARIOS[name]
                r = stalwart_run(
                    args,
                    ns,
                    work / f"{name}-{rep}",
                    name,
                    spec.format(step=args.fault_step),
                    kinds,
                    steps=args.steps,
                    noise=0.0,
                    limit=120,
                )
                r["rep"] = rep
                results["runs"].append(r)
                print(json.dumps(r), flush=True)
        for rep in range(args.torchrun_reps):
            r = torchrun_hang(args, ns, work / f"torchrun-{rep}")
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
        if args.quiet_seconds > 0:
            steps = int(args.quiet_seconds / args.step_time)
            r = stalwart_run(
                args,
                ns,
                work / "quiet",
                "fault-free",
                "",
                (),
                steps=steps,
                noise=args.quiet_noise,
                limit=args.quiet_seconds * 1.5 + 120,
            )
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    write(results)


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detection.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| fault | runs detected | median latency (s) | median step (s) | target (s) | within target |",
        "|---|---|---|---|---|---|",
    ]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results["runs"]:
        by.setdefault(r["scenario"], []).append(r)
    for name, runs in by.items():
        lat = _median([r.get("latency_s") for r in runs])
        step = _median([r.get("step_time_s") for r in runs])
        detected = sum(1 for r in runs if r.get("detected", r.get("latency_s") is not None))
        target, ok = "", ""
        if name in ("hang", "hang_gil", "stop") and step is not None:
            t = 3 * step + 1
            target, ok = f"{t:.2f} (3 x step + 1)", "yes" if lat is not None and lat <= t else "no"
        elif name == "nan" and step is not None:
            target, ok = f"{step:.2f} (one step)", "yes" if lat is not None and lat <= step else "no"
        elif name == "fault-free":
            alarms = sum(len(r.get("false_alarms", [])) for r in runs)
            target, ok = "0 false alarms", f"{alarms} false alarms"
        rows.append(f"| {name} | {detected}/{len(runs)} | {_fmt(lat)} | {_fmt(step)} | {target} | {ok} |")
    rows += [
        "",
        "hang (torchrun): the same hang under plain `torchrun`, which acts only when the job's process-group "
        "timeout fires (30 s here; torch's default is 30 min for gloo, 10 min for NCCL). slow: rank 1 twice "
        "as slow; the verdict needs a 20-step median above 1.5x for 20 more steps. fault-free: "
        "a noisy step time (+-30%) for the whole run, every monitor at its defaults.",
    ]
    cost = results["report_cost"]
    rows += [
        "",
        f"`report()`: {cost['report_us']:.2f} µs per call, {cost['ratio']:.2f}x a bare `sendto` of the "
        f"same record ({cost['sendto_us']:.2f} µs); medians of {len(cost['runs_us'])} runs of 20,000 calls.",
    ]
    header = (
        f"# Detection latency ({results['host']}, {results['cpus']} CPUs, step time "
        f"{results['step_time_s']} s, medians)\n\n"
    )
    (RESULTS / "detection.md").write_text(header + "\n".join(rows) + "\n")
    print(header + "\n".join(rows))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
