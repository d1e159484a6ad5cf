"""Hang detection: learned timeouts on an injected clock, and real hung, GIL-holding and stopped
workers whose stacks are dumped before the verdict."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stalwart.health.api import Action, FaultKind
from stalwart.health.hang import HangConfig, HangMonitor
from stalwart.health.stacks import StackDump, catches_signal, flight_recorder_env, proc_state
from stalwart.worker.api import METRIC_BUSY, METRIC_EXITING, STACK_DUMP_SIGNAL, Report

from .clock import Clock, context


def _report(clock: Clock, monitor: HangMonitor, step: int, local_rank: int = 0) -> None:
    monitor.on_report(
        Report(rank=10 + local_rank, local_rank=local_rank, step=step, time=clock(), pid=1, loss=1.0)
    )


def _learn(clock: Clock, m: HangMonitor, interval: float, steps: int, ranks: int = 2) -> None:
    for step in range(1, steps + 1):
        for lr in range(ranks):
            _report(clock, m, step, lr)
        clock.advance(interval)


def test_timeout_is_learned_from_the_step_interval() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(factor=3, floor=2, startup_timeout=600))
    m.start(context(clock))
    _report(clock, m, 1)
    clock.advance(100)
    assert m.poll(clock()) == []  # interval not learned yet: the startup timeout applies
    _report(clock, m, 2)  # a slow first step: warm-up, not learned
    clock.advance(1.0)
    for step in range(3, 11):
        _report(clock, m, step)
        clock.advance(1.0)
    r = m._ranks[10]
    assert m.timeout_for(r) == pytest.approx(3.0)
    clock.advance(2.9 - 1.0)  # 2.9 s since the last report
    assert m.poll(clock()) == []
    clock.advance(0.2)
    [f] = m.poll(clock())  # no workers to dump: the verdict is immediate
    assert f.kind is FaultKind.HANG and f.action is Action.RESTART
    assert (f.rank, f.local_rank) == (10, 0)
    assert f.evidence["mode"] == "reports" and f.evidence["last_step"] == 10
    assert f.evidence["timeout_s"] == pytest.approx(3.0)
    clock.advance(10)
    assert m.poll(clock()) == []  # one hang per generation


def test_floor_and_longest_recent_interval_widen_the_timeout() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(factor=3, floor=2))
    m.start(context(clock))
    _learn(clock, m, interval=0.1, steps=10, ranks=1)
    assert m.timeout_for(m._ranks[10]) == pytest.approx(2.0)  # 3 x 0.1 s is under the floor
    clock.advance(5.0)  # a slow step (an evaluation, a checkpoint)... that completes
    for step in range(11, 20):
        _report(clock, m, step)
        clock.advance(0.1)
    assert m.timeout_for(m._ranks[10]) == pytest.approx(1.5 * 5.1)


def test_the_timeout_follows_a_slowdown_within_a_few_steps() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(factor=3, floor=1))
    m.start(context(clock))
    _learn(clock, m, interval=0.25, steps=40, ranks=1)
    assert m.timeout_for(m._ranks[10]) == pytest.approx(1.0)
    for step in range(41, 45):  # the job now steps at 0.5 s (a straggler elsewhere)
        _report(clock, m, step)
        clock.advance(0.5)
    assert m.timeout_for(m._ranks[10]) == pytest.approx(1.5)
    clock.advance(1.2 - 0.5)  # one 1.2 s step: slow, but not 3x the new pace
    assert m.poll(clock()) == []


def test_a_stalled_rank_is_caught_while_the_other_progresses() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(floor=1))
    m.start(context(clock))
    _learn(clock, m, interval=0.2, steps=8)
    for step in range(9, 20):
        _report(clock, m, step, local_rank=1)
        clock.advance(0.2)
    [f] = m.poll(clock())
    assert f.rank == 10 and f.evidence["stalled_ranks"] == [10]
    assert f.evidence["last_steps"] == {"10": 8, "11": 19}


def test_a_repeated_hang_at_the_same_step_backs_off() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(factor=3, floor=1, repeat_backoff=4))
    m.start(context(clock))
    _learn(clock, m, interval=1.0, steps=6, ranks=1)
    clock.advance(3)
    assert len(m.poll(clock())) == 1
    m.stop()
    m.start(context(clock))  # the restarted generation resumes and stalls at the same step again
    _report(clock, m, 4)
    clock.advance(1.0)
    _report(clock, m, 5)
    assert m.timeout_for(m._ranks[10]) == pytest.approx(600.0)  # warm-up after the restart
    clock.advance(1.0)
    _report(clock, m, 6)
    clock.advance(1.0)
    assert m.timeout_for(m._ranks[10]) == pytest.approx(12.0)  # learned in generation 0, backed off
    clock.advance(10)  # 11 s since the last report
    assert m.poll(clock()) == []
    clock.advance(2)
    assert len(m.poll(clock())) == 1


def test_busy_notices_extend_the_timeout_and_exiting_ranks_are_not_judged() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(factor=3, floor=1))
    m.start(context(clock))
    _learn(clock, m, interval=0.2, steps=8)
    m.on_report(Report(rank=10, local_rank=0, step=8, time=clock(), pid=1, metrics={METRIC_BUSY: 30.0}))
    m.on_report(Report(rank=11, local_rank=1, step=8, time=clock(), pid=1, metrics={METRIC_EXITING: 1.0}))
    clock.advance(29)
    assert m.poll(clock()) == []  # rank 10 is busy for 30 s, rank 11 is exiting
    clock.advance(2)
    [f] = m.poll(clock())
    assert f.rank == 10 and f.evidence["stalled_ranks"] == [10]


def test_a_busy_phase_is_not_learned_as_a_step_interval() -> None:
    # a 300 s blocking save announced with busy(400) used to set the timeout to 1.5 x 300 s for
    # the next 50 steps: a real hang right after took minutes to catch instead of seconds
    clock = Clock()
    m = HangMonitor(HangConfig(factor=3, floor=2))
    m.start(context(clock))
    _learn(clock, m, interval=1.0, steps=30, ranks=1)
    before = m.timeout_for(m._ranks[10])
    m.on_report(Report(rank=10, local_rank=0, step=30, time=clock(), pid=1, metrics={METRIC_BUSY: 400.0}))
    clock.advance(300)
    for step in range(31, 37):
        _report(clock, m, step)
        clock.advance(1.0)
    assert m.timeout_for(m._ranks[10]) == pytest.approx(before)
    # a generous allowance for a short save does not stop the learning after it
    m.on_report(Report(rank=10, local_rank=0, step=36, time=clock(), pid=1, metrics={METRIC_BUSY: 60.0}))
    clock.advance(1.0)
    for step in range(37, 90):
        _report(clock, m, step)
        clock.advance(0.5)  # the pace changed after the save: it is learned at once
    assert m.timeout_for(m._ranks[10]) == pytest.approx(2.0)  # the floor: 3 x 0.5 s is less


def test_a_step_counter_that_restarts_each_epoch_is_progress_not_a_hang() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(factor=3, floor=2))
    m.start(context(clock))
    for _epoch in range(3):
        for step in range(20):  # enumerate(loader): 0, 1, ... again every epoch
            _report(clock, m, step)
            clock.advance(1.0)
            assert m.poll(clock()) == [], f"a hang in healthy training at step {step}"
    clock.advance(10)
    [f] = m.poll(clock())  # a real stall is still caught
    assert f.kind is FaultKind.HANG


def test_without_reports_falls_back_to_log_silence() -> None:
    clock = Clock()
    m = HangMonitor(HangConfig(log_silence=60))
    m.start(context(clock))
    clock.advance(50)
    m.on_line(0, "epoch 1 batch 7")
    clock.advance(59)
    assert m.poll(clock()) == []
    clock.advance(2)
    [f] = m.poll(clock())
    assert f.evidence["mode"] == "log_silence" and f.rank is None
    off = HangMonitor(HangConfig(log_silence=0))
    off.start(context(clock))
    clock.advance(10_000)
    assert off.poll(clock()) == []


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="factor"):
        HangConfig(factor=0)
    with pytest.raises(ValueError, match="log_silence"):
        HangConfig(log_silence=-1)


def test_proc_state_and_signal_mask_are_read_from_proc(tmp_path: Path) -> None:
    assert proc_state(os.getpid()) in ("R", "S")
    assert proc_state(2**22 + 12345) is None
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert not catches_signal(p.pid, STACK_DUMP_SIGNAL)
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while proc_state(p.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)  # polling with a deadline: the stop is delivered asynchronously
        assert proc_state(p.pid) == "T"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    fake = tmp_path / "77"
    fake.mkdir()
    (fake / "stat").write_text("77 (a) b) T 1 77 77 0 -1")
    (fake / "status").write_text(f"Name:\tx\nSigCgt:\t{1 << (STACK_DUMP_SIGNAL - 1):016x}\n")
    assert proc_state(77, proc=str(tmp_path)) == "T"
    assert catches_signal(77, STACK_DUMP_SIGNAL, proc=str(tmp_path))


FAST = ["--step-time", "0.05"]


@pytest.mark.parametrize("kind", ["hang", "hang_gil"])
def test_hung_worker_is_detected_with_its_stacks_dumped(node, kind: str) -> None:
    m = HangMonitor(HangConfig(floor=1.0))
    n = node([m], nproc=2, args=FAST, fault=f"{kind}:rank=1:step=8")
    f = n.wait_fault(FaultKind.HANG, timeout=30)
    assert f is not None, n.lines[-5:]
    assert f.rank == 1 and f.evidence["mode"] == "reports"
    # An independent job: rank 0 keeps going and stays out of the verdict.
    assert f.evidence["stalled_ranks"] == [1]
    worker = f.evidence["workers"]["1"]
    assert worker["stacks"] and os.path.exists(worker["stacks"])
    text = Path(worker["stacks"]).read_text()
    assert "_fire" in text and "steps_worker.py" in text  # the stack shows where it hangs
    assert worker["stacks"] in f.message
    assert f.evidence["workers"]["0"]["stacks"]  # every worker is dumped, not only the hung one
    assert n.registry.get_sample_value("stalwart_stack_dumps_total", {"outcome": "dumped"}) == 2


def test_stopped_worker_is_reported_as_stopped(node) -> None:
    m = HangMonitor(HangConfig(floor=30.0, stopped_grace=0.5))  # a long floor: the stop check decides
    n = node([m], nproc=2, args=FAST, fault="stop:rank=0:step=5")
    f = n.wait_fault(FaultKind.HANG, timeout=20)
    assert f is not None
    assert f.evidence["mode"] == "stopped" and f.rank == 0
    w = f.evidence["workers"]["0"]
    assert w["state"] == "stopped" and "cannot dump" in w["note"]
    assert f.evidence["workers"]["1"]["stacks"]


def test_the_flight_recorder_pipe_of_each_rank_is_poked(tmp_path: Path) -> None:
    env = flight_recorder_env(str(tmp_path))
    prefix = env["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"]
    assert prefix.startswith(str(tmp_path)) and env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == prefix
    os.makedirs(os.path.dirname(prefix))
    os.mkfifo(prefix + "3.pipe")  # what ProcessGroupNCCL creates for rank 3
    reader = os.open(prefix + "3.pipe", os.O_RDONLY | os.O_NONBLOCK)  # its watchdog's end
    try:
        dump = StackDump(stack_dir=str(tmp_path / "stacks"), log_dir=str(tmp_path), pyspy=None)
        dump.request({0: 2**22 + 12345, 1: 2**22 + 12346}, {0: 3, 1: 4}, now=0.0)
        assert os.read(reader, 100) == b"1\n"
        assert dump.flight_recorder == [prefix + "3"]
        assert dump.done(0.0)  # both "workers" are gone: nothing to wait for
        assert dump.evidence()["3"]["note"] == "process has exited"
    finally:
        os.close(reader)
