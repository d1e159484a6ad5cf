"""``stalwart run`` end to end on one node: crash -> recovery from the checkpoint, budget, user error."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stalwart.agent.policy import EXIT_BUDGET_SPENT
from stalwart.agent.procs import ExitWatcher
from stalwart.agent.timeline import parse_event_line

STALWART = [sys.executable, "-m", "stalwart.cli"]
StalwartRunner = Any  # the ``stalwart`` fixture's type (tests/conftest.py)


def _finish(p: subprocess.Popen[str], timeout: float = 120) -> str:
    out, _ = p.communicate(timeout=timeout)
    return out


def test_a_crashed_worker_is_restarted_and_training_continues_from_the_checkpoint(
    stalwart: StalwartRunner, tmp_path: Path
) -> None:
    marks = tmp_path / "marks.txt"
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--fault",
        "crash:rank=1:step=4",
        "--node-name",
        "n0",
        "--pre-train-script",
        f"sh -c 'echo pre $STALWART_GENERATION >> {marks}'",
        "--post-train-script",
        f"sh -c 'echo post >> {marks}'",
        "--log-events",
        *stalwart.tiny_args(8),
    )
    out = _finish(p)
    assert p.returncode == 0, out
    # --log-events: every event of the events file is on the output too (pods lose the file)
    echoed = [e for e in map(parse_event_line, out.splitlines()) if e is not None]
    assert echoed and echoed == [e for e in stalwart.events() if e["node"] == "n0"]
    rank1 = stalwart.progress_of(1)
    assert [s for g, s in rank1 if g == 0] == [1, 2, 3]  # killed inside report(4)
    assert [s for g, s in rank1 if g == 1] == [5, 6, 7, 8]  # resumed from the step-4 checkpoint
    assert marks.read_text().split("\n")[:3] == ["pre 0", "pre 1", "post"]
    # console: prefixed worker lines, the restart, and the timeline at exit
    assert "[n0/1] step 3 loss" in out
    assert "rank 1 signal SIGKILL -> restart" in out
    assert "incident -> generation 1" in out
    # per-rank log files and the events file
    assert "step 8 loss" in (stalwart.log_dir / "n0" / "gen-1" / "rank-0.log").read_text()
    kinds = [e["event"] for e in stalwart.events()]
    for kind in (
        "fault",
        "restart",
        "budget",
        "workers_stopped",
        "rendezvous",
        "workers_started",
        "first_step",
        "exit",
    ):
        assert kind in kinds
    first = [e for e in stalwart.events() if e["event"] == "first_step" and e["generation"] == 1]
    assert first and first[0]["step"] == 5
    ev = subprocess.run(
        [*STALWART, "events", str(stalwart.log_dir)], capture_output=True, text=True, timeout=60
    )
    assert ev.returncode == 0, ev.stderr
    assert "generation 1" in ev.stdout and "rank 1" in ev.stdout and "first_step" in ev.stdout


@pytest.mark.skipif(not ExitWatcher.supported(), reason="pidfd_open is refused here: the agent polls")
def test_exits_are_seen_when_they_happen_not_at_the_next_monitor_interval(stalwart: StalwartRunner) -> None:
    # With a 600 s interval, a loop that only polled would see neither the crash nor the end
    # before _finish's deadline: the exit watcher wakes it.
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "600",
        "--fault",
        "crash:rank=1:step=3",
        *stalwart.tiny_args(5),
    )
    out = _finish(p, timeout=120)
    assert p.returncode == 0, out
    assert [s for g, s in stalwart.progress_of(1) if g == 1] == [4, 5]
    # (rank 0's traceback from the broken collective may add a log rule's warning)
    (fault,) = [e for e in stalwart.events() if e["event"] == "fault" and e["fault"]["kind"] == "worker_exit"]
    assert fault["fault"]["message"] == "rank 1 signal SIGKILL"


def test_spent_budget_exits_76_naming_the_rank_exit_code_and_traceback(stalwart: StalwartRunner) -> None:
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--no-standby",
        "--fault",
        "raise:rank=1:step=2,raise:rank=1:step=4",
        *stalwart.tiny_args(8),
    )
    out = _finish(p)
    assert p.returncode == EXIT_BUDGET_SPENT, out
    summary = out[out.index("job failed") :]
    assert "restart budget spent (1 of 1 used)" in summary
    assert "root cause: rank 1" in summary and "exit code 1" in summary
    assert "InjectedFault" in summary and "Traceback" in summary
    budget = [e for e in stalwart.events() if e["event"] == "budget"]
    assert [e["used"] for e in budget] == [1]


def test_a_user_error_stops_at_once_without_spending_the_budget(
    stalwart: StalwartRunner, tmp_path: Path
) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import stalwart_no_such_module_xyz\n")
    p = stalwart.start(
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "5", "--no-standby",
        "--node-name", "u", "--local-ranks-filter", "0", str(script),
    )  # fmt: skip
    out = _finish(p)
    assert p.returncode == 3, out
    assert "user error" in out
    assert (
        "ModuleNotFoundError: No module named 'stalwart_no_such_module_xyz'" in out[out.index("job failed") :]
    )
    started = [e for e in stalwart.events() if e["event"] == "workers_started"]
    assert len(started) == 2  # the first try and one free retry, never the budget
    assert all(e["used"] == 0 for e in stalwart.events() if e["event"] == "budget")
    # --local-ranks-filter 0: rank 1 is not echoed, but its log file has everything
    assert "[u/0] ModuleNotFoundError" in out and "[u/1]" not in out
    assert "ModuleNotFoundError" in (stalwart.log_dir / "u" / "gen-1" / "rank-1.log").read_text()


def test_a_failing_pre_train_script_is_a_clear_error(stalwart: StalwartRunner) -> None:
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "1",
        "--no-standby",
        "--pre-train-script",
        "sh -c 'exit 5'",
        *stalwart.tiny_args(2),
    )
    out = _finish(p)
    assert p.returncode == 4, out
    assert "pre-train script" in out and "exited with 5" in out
    assert stalwart.progress_of(0) == []


def test_the_cli_rejects_bad_flags_with_usage_errors(tmp_path: Path) -> None:
    p = subprocess.run(
        [*STALWART, "run", "--log-dir", str(tmp_path), "--fault", "explode:rank=0", "x.py"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "unknown kind 'explode'" in p.stderr


def test_run_help_lists_torchrun_and_stalwart_flags() -> None:
    p = subprocess.run([*STALWART, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for flag in (
        "--nproc-per-node",
        "--rdzv-backend",
        "--max-restarts",
        "--fault",
        "--no-standby",
        "--status-port",
        "--pre-train-script",
        "--user-error-threshold",
    ):
        assert flag in p.stdout


def test_a_hung_rank_is_detected_by_the_hang_monitor_and_the_job_restarts(stalwart: StalwartRunner) -> None:
    p = stalwart.start(
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--no-standby", "--node-name", "h",
        "--fault", "hang:rank=1:step=6", "--hang-floor", "2",
        *stalwart.tiny_args(10, "--step-time", "0.1"),
    )  # fmt: skip
    out = _finish(p)
    assert p.returncode == 0, out
    faults = [e["fault"] for e in stalwart.events() if e["event"] == "fault" and e["verdict"] == "restart"]
    assert [f["kind"] for f in faults] == ["hang"], faults
    assert [s for g, s in stalwart.progress_of(1) if g == 1] == [7, 8, 9, 10]
    assert list((stalwart.log_dir / "stacks").glob("stacks-rank1-*")), "no stack dump of the hung rank"


def test_a_status_port_in_use_is_a_clear_error(stalwart: StalwartRunner) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = stalwart.start("--standalone", "--status-port", str(port), *stalwart.tiny_args(1))
        out = _finish(p)
    assert p.returncode == 2, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "pick a free port" in out


def test_a_busy_notice_before_the_first_step_is_not_the_first_step(
    stalwart: StalwartRunner, tmp_path: Path
) -> None:
    script = tmp_path / "busy_first.py"
    script.write_text(
        "from stalwart.worker import busy, report\n"
        "busy(30)  # e.g. before loading a large checkpoint\n"
        "report(1, loss=1.0)\n"
        "report(2, loss=0.5)\n"
    )
    p = stalwart.start(
        "--standalone", "--nproc-per-node", "1", "--no-standby", "--node-name", "b", str(script)
    )
    out = _finish(p)
    assert p.returncode == 0, out
    first = [e for e in stalwart.events() if e["event"] == "first_step"]
    assert [(e["generation"], e["step"]) for e in first] == [(0, 1)], first


FIRST_LINE_FAULT = """
import os, sys, time
if os.environ["STALWART_GENERATION"] == "0":
    print("FATAL: quota exceeded on /scratch", flush=True)  # the very first thing it does
    time.sleep(300)
sys.exit(0)
"""


def test_a_log_rule_matches_a_workers_first_line_and_the_job_restarts(
    stalwart: StalwartRunner, tmp_path: Path
) -> None:
    # the monitors start before the workers: a line printed at once is not missed
    script = tmp_path / "first_line.py"
    script.write_text(FIRST_LINE_FAULT)
    p = stalwart.start(
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--node-name", "l",
        "--log-fault-pattern", r"FATAL: quota exceeded", str(script),
    )  # fmt: skip
    out = _finish(p)
    assert p.returncode == 0, out
    faults = [e["fault"] for e in stalwart.events() if e["event"] == "fault" and e["verdict"] == "restart"]
    assert faults and all("fault-pattern-1" in f["message"] for f in faults), faults
    assert [e["generation"] for e in stalwart.events() if e["event"] == "workers_started"] == [0, 1]
