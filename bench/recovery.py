"""Recovery benchmark: SIGKILL one worker, time until training takes its next step.

The same script (``examples/train.py``: 2 gloo workers, checkpoint every 50 steps) runs under
``torchrun`` and under ``stalwart run``, alternating, several repetitions each, in one run of
this benchmark. At ``--kill-step`` the benchmark SIGKILLs worker rank 1 from outside (its pid
comes from the worker's ``started`` line, checked with psutil to be a live descendant of the
launcher). Recovery time is from the kill to the first step of the restarted generation (the
worker's wall clock, printed in its step line). A run has *recovered* when that step came and the
job then finished with exit code 0, within ``--run-timeout``.

Both launchers run in one network namespace with only ``lo`` up (torchrun's store binds the
wildcard address). Needs root. Results: ``bench/results/recovery.json`` and ``recovery.md``.

    python bench/recovery.py [--reps 5] [--launchers torchrun,stalwart]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from netns import loopback_netns

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples" / "train.py")
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"

RE_STARTED = re.compile(r"started rank (\d+) pid (\d+) gen (\d+)")
RE_STEP = re.compile(r"step (\d+) loss (\S+) t ([\d.]+) gen (\d+)")
RE_DONE = re.compile(r"done steps \d+ final_loss (\S+)")
RE_TIMING = re.compile(r"timing gen (\d+) ((?:\w+ [\d.]+ ?)+)")


@dataclass
class Run:
    """One repetition: what happened and when (seconds relative to the kill)."""

    launcher: str
    rep: int
    killed_pid: int | None = None
    kill_step: int | None = None
    gen_at_kill: int | None = None
    recovery_s: float | None = None
    resumed_step: int | None = None
    generation_after: int | None = None
    exit_code: int | None = None
    final_loss: str | None = None
    loadavg_at_kill: float | None = None
    worker_phases: dict[str, float] = field(default_factory=dict)  # s after the kill, restarted rank 0
    agent_events: list[tuple[str, int, float]] = field(
        default_factory=list
    )  # (event, generation, s after kill)
    error: str = ""
    recovered: bool = False
    tail: list[str] = field(default_factory=list)


def launcher_cmd(name: str, log_dir: Path, restarts: int) -> list[str]:
    common = ["--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}", f"--log-dir={log_dir}"]
    if name == "torchrun":
        return [str(BIN / "torchrun"), *common]
    if name == "stalwart":
        return [str(BIN / "stalwart"), "run", *common]
    raise SystemExit(f"unknown launcher {name!r}: use torchrun or stalwart")


def _reader(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        q.put(line.rstrip("\n"))
    q.put(None)


def _kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def one_run(args: argparse.Namespace, launcher: str, rep: int, ns: str, work: Path) -> Run:
    run = Run(launcher, rep)
    ckpt = work / f"{launcher}-{rep}-ckpt"
    train = [
        "--steps",
        str(args.steps),
        "--ckpt-dir",
        str(ckpt),
        "--ckpt-every",
        str(args.ckpt_every),
        "--step-time",
        str(args.step_time),
        "--hidden",
        str(args.hidden),
        "--pg-timeout",
        str(args.pg_timeout),
    ]
    cmd = [
        "ip",
        "netns",
        "exec",
        ns,
        *launcher_cmd(launcher, work / f"{launcher}-{rep}-logs", args.max_restarts),
        TRAIN,
        *train,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "LOGLEVEL": "WARNING"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    pids: dict[tuple[int, int], int] = {}  # (gen, rank) -> pid
    t_kill: float | None = None
    deadline = time.monotonic() + args.run_timeout
    tail: list[str] = []
    try:
        while time.monotonic() < deadline:
            try:
                line = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            tail = [*tail[-40:], line]
            for m in RE_STARTED.finditer(line):
                pids[(int(m.group(3)), int(m.group(1)))] = int(m.group(2))
            for m in RE_STEP.finditer(line):
                step, t, gen = int(m.group(1)), float(m.group(3)), int(m.group(4))
                if t_kill is None and step >= args.kill_step:
                    t_kill = _kill_worker(run, pids, gen, proc.pid, step)
                elif (
                    t_kill is not None
                    and run.recovery_s is None
                    and t > t_kill
                    and gen > (run.gen_at_kill or 0)
                ):
                    # a step of a new generation: an old worker may still finish the step it was in
                    run.recovery_s = round(t - t_kill, 3)
                    run.resumed_step, run.generation_after = step, gen
            for m in RE_TIMING.finditer(line):
                if t_kill is not None and int(m.group(1)) > (run.gen_at_kill or 0) and not run.worker_phases:
                    kv = m.group(2).split()
                    run.worker_phases = {
                        k: round(float(v) - t_kill, 3) for k, v in zip(kv[::2], kv[1::2], strict=True)
                    }
            for m in RE_DONE.finditer(line):
                run.final_loss = m.group(1)
        else:
            run.error = f"timed out after {args.run_timeout}s"
        proc.wait(timeout=30 if proc.poll() is None and not run.error else 1)
    except subprocess.TimeoutExpired:
        run.error = run.error or "launcher did not exit"
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
        proc.wait()
    run.exit_code = proc.returncode
    if t_kill is not None:
        run.agent_events = _agent_events(work / f"{launcher}-{rep}-logs", t_kill)
    run.recovered = run.recovery_s is not None and run.exit_code == 0 and run.final_loss is not None
    if not run.recovered:
        run.tail = tail[-15:]
    return run


def _agent_events(log_dir: Path, t_kill: float) -> list[tuple[str, int, float]]:
    """stalwart's recovery events (its JSONL timeline) from the kill on; torchrun writes none."""
    events = []
    for path in log_dir.glob("events-*.jsonl"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                e = json.loads(line)
                if e["time"] >= t_kill - 1:
                    events.append((e["event"], int(e["generation"]), round(e["time"] - t_kill, 3)))
    return sorted(events, key=lambda e: e[2])


def _kill_worker(
    run: Run, pids: dict[tuple[int, int], int], gen: int, launcher_pid: int, step: int
) -> float | None:
    pid = pids.get((gen, 1))
    if pid is None:
        run.error = "no pid for rank 1 (no 'started' line)"
        return None
    descendants = {p.pid for p in psutil.Process(launcher_pid).children(recursive=True)}
    if pid not in descendants:
        run.error = f"rank 1 pid {pid} is not a live descendant of the launcher"
        return None
    with open("/proc/loadavg") as f:
        run.loadavg_at_kill = float(f.read().split()[0])
    t = time.time()
    os.kill(pid, signal.SIGKILL)
    run.killed_pid, run.kill_step, run.gen_at_kill = pid, step, gen
    return t


def summarize(runs: list[Run], launchers: list[str]) -> dict:
    out: dict = {}
    for name in launchers:
        rs = [r for r in runs if r.launcher == name]
        times = [r.recovery_s for r in rs if r.recovered and r.recovery_s is not None]
        out[name] = {
            "runs": len(rs),
            "recovered": sum(r.recovered for r in rs),
            "median_s": round(statistics.median(times), 3) if times else None,
            "min_s": min(times) if times else None,
            "max_s": max(times) if times else None,
            "times_s": times,
            "extra_restarts": sum(1 for r in rs if r.generation_after is not None and r.generation_after > 1),
        }
        first_try = [
            r.recovery_s for r in rs if r.recovered and r.recovery_s is not None and r.generation_after == 1
        ]
        out[name]["first_try_runs"] = len(first_try)
        out[name]["first_try_median_s"] = round(statistics.median(first_try), 3) if first_try else None
    if out.get("torchrun", {}).get("median_s") and out.get("stalwart", {}).get("median_s"):
        out["speedup"] = round(out["torchrun"]["median_s"] / out["stalwart"]["median_s"], 2)
    return out


def markdown(summary: dict, args: argparse.Namespace, meta: dict) -> str:
    lines = [
        "# Recovery benchmark",
        "",
        f"SIGKILL of worker rank 1 at step {args.kill_step} of `examples/train.py` (2 gloo workers, hidden "
        f"{args.hidden}, {args.step_time}s per step, checkpoint every {args.ckpt_every} steps); time from the kill "
        "to the next completed step (a step of the restarted generation). The kill comes about 10 s into "
        "training, as faults do in real jobs: at a job's first start every worker is a promoted warm "
        "standby and stalwart refills the pool in the background, so a kill in the first seconds meets "
        "standbys still importing torch. Both launchers with `--standalone --max-restarts "
        f"{args.max_restarts}`, each in a loopback-only network namespace, alternating, {args.reps} runs each.",
        "",
        f"A run *recovered* when such a step came and the job then finished with exit code 0, all within "
        f"{args.run_timeout:.0f} s; medians are over recovered runs. `train.py` bounds a hung gloo re-connect "
        f"with a {args.pg_timeout:.0f} s process-group timeout.",
        "",
        "| launcher | runs | recovered | median s | min s | max s | runs needing >1 restart |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.launchers:
        s = summary[name]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {name} | {s['runs']} | {s['recovered']}/{s['runs']} | {fmt(s['median_s'])} | {fmt(s['min_s'])} "
            f"| {fmt(s['max_s'])} | {s['extra_restarts']} |"
        )
    if "speedup" in summary:
        lines += ["", f"**stalwart recovers {summary['speedup']}x faster than torchrun (median).**"]
    for name in args.launchers:
        s = summary[name]
        if s["first_try_runs"] and s["extra_restarts"]:
            lines += [
                "",
                f"{name}'s restarts that worked at the first try ({s['first_try_runs']} of {s['runs']}) took "
                f"{s['first_try_median_s']:.2f} s (median); {s['extra_restarts']} recovered only after more "
                f"restarts and {s['runs'] - s['recovered']} not in time (the restarted workers' gloo "
                "connect fails or hangs: stale rendezvous store keys, see the feasibility notes).",
            ]
    lines += [
        "",
        f"Machine: {meta['cpus']} CPUs, {meta['platform']}, torch {meta['torch']}, python {meta['python']}; "
        f"load average {meta['loadavg']} at start (other jobs share the machine). {meta['date']}.",
        "Re-run with `make bench` (or `python bench/recovery.py`); raw runs in `recovery.json`.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SIGKILL a worker; time torchrun's and stalwart's recovery.")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--launchers", default="torchrun,stalwart")
    p.add_argument("--kill-step", type=int, default=150)
    p.add_argument("--steps", type=int, default=170)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--step-time", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--pg-timeout", type=float, default=20.0, help="bounds a hung gloo re-connect")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--run-timeout", type=float, default=150.0)
    p.add_argument("--out", default=str(RESULTS), help="directory for recovery.json and recovery.md")
    p.add_argument("--workdir", default="", help="keep logs and checkpoints here (default: a temporary dir)")
    p.add_argument(
        "--render", action="store_true", help="only rewrite recovery.md from recovery.json in --out"
    )
    args = p.parse_args(argv)
    args.launchers = [x.strip() for x in args.launchers.split(",") if x.strip()]
    if args.kill_step >= args.steps or args.reps < 1:
        p.error("--kill-step must be below --steps, and --reps >= 1")
    return args


def render(out: Path) -> str:
    """Rewrite ``recovery.md`` from ``recovery.json`` (after editing the text, not the numbers)."""
    data = json.loads((out / "recovery.json").read_text())
    args = argparse.Namespace(**data["params"])
    data["summary"] = summarize([Run(**r) for r in data["runs"]], args.launchers)
    (out / "recovery.json").write_text(json.dumps(data, indent=2) + "\n")
    md = markdown(data["summary"], args, data["machine"])
    (out / "recovery.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(Path(args.out)))
        return 0
    if os.geteuid() != 0:
        print(
            "bench/recovery.py needs root (it creates a network namespace with `ip netns`).", file=sys.stderr
        )
        return 2
    import torch

    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    meta = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": load,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    runs: list[Run] = []
    keep = (
        contextlib.nullcontext(args.workdir)
        if args.workdir
        else tempfile.TemporaryDirectory(prefix="stalwart-bench-")
    )
    with keep as work, loopback_netns("stalwart_bench") as ns:
        for rep in range(args.reps):
            for launcher in args.launchers:  # alternate, so that load drifts hit both alike
                r = one_run(args, launcher, rep, ns, Path(work))
                runs.append(r)
                status = f"{r.recovery_s:.2f}s" if r.recovered else f"NOT RECOVERED {r.error}"
                print(
                    f"{launcher:9s} rep {rep}: {status} (gen after {r.generation_after}, exit {r.exit_code})",
                    flush=True,
                )
    summary = summarize(runs, args.launchers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in vars(args).items() if k not in ("out", "render", "workdir")}
    (out / "recovery.json").write_text(
        json.dumps(
            {"params": params, "machine": meta, "summary": summary, "runs": [asdict(r) for r in runs]},
            indent=2,
        )
        + "\n"
    )
    md = markdown(summary, args, meta)
    (out / "recovery.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
