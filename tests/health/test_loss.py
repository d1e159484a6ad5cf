"""Loss anomalies: NaN/Inf from reports or printed lines, and robust-z-score spikes."""

from __future__ import annotations

import math
import random

import pytest

from stalwart.health.api import Action, FaultKind
from stalwart.health.loss import LossConfig, LossMonitor, parse_loss_line, robust_zscore
from stalwart.worker.api import Report

from .clock import Clock, context


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("loss: nan", math.nan),
        ("step 12 | loss=nan | lr 3e-4", math.nan),
        ("loss nan", math.nan),
        ("{'loss': inf, 'grad_norm': 1.0}", math.inf),
        ('{"loss": "-inf"}', -math.inf),
        ("iteration 100 lm loss: 2.345E+00 grad norm 1.2", 2.345),
        ("train_loss=1.5e-3", 1.5e-3),
        ("Loss: 0.25", 0.25),
        ("loss: tensor(nan, grad_fn=<AddBackward0>)", math.nan),
        ("{'loss': 0.7, 'eval_loss': 3.9}", 0.7),  # the training loss, not the evaluation's
        ("interval_loss: 1.2", 1.2),
        ("epoch 001:    100 / 1000 loss=4.2, nll_loss=3.9, ppl=15", 4.2),  # fairseq's training lines
        ("{'eval_mlm_loss': 2.7, 'loss': 2.0}", 2.0),  # past an evaluation's metric
        ('{"epoch": 1, "train_loss": "4.2", "train_nll_loss": "3.9"}', 4.2),  # fairseq json
        (" iteration 10/ 100 | lm loss: 2.345E+00 | validation loss at step 5 pending", 2.345),
        ("\x1b[31mstep:  1  \x1b[32mloss:  7.1234  \x1b[33mmemory: 1.2GiB", 7.1234),  # torchtitan
    ],
)
def test_parses_common_loss_lines(line: str, value: float) -> None:
    got = parse_loss_line(line)
    assert got is not None
    assert (math.isnan(got) and math.isnan(value)) or got == value


@pytest.mark.parametrize(
    "line",
    [
        "loss_scale: 65536",
        "lossy compression 3",
        "no numbers here",
        "closs: 1",
        "{'eval_loss': 3.91, 'eval_runtime': 12.0}",  # evaluations are not the training curve
        "val_loss=4.2",
        "Eval loss: nan",
        "val/loss=2.100",  # Lightning
        "test loss: 1.5",
        "epoch 001 | valid on 'valid' subset | loss 3.9 | nll_loss 3.1 | ppl 8.6",  # fairseq
        '{"epoch": 1, "valid_loss": "3.9", "valid_nll_loss": "3.1", "valid_ppl": "8.6"}',  # fairseq json
        "{'eval_loss': 2.9, 'eval_mlm_loss': 2.7, 'eval_runtime': 1.0}",  # HF, a second eval metric
        "validate step: 100  loss:  3.9000  memory: 1.2GiB",  # torchtitan's validator
    ],
)
def test_ignores_lines_that_only_look_like_loss(line: str) -> None:
    assert parse_loss_line(line) is None


def _report(rank: int, step: int, loss: float | None, generation: int = 0) -> Report:
    return Report(
        rank=10 + rank, local_rank=rank, step=step, time=0.0, pid=1, generation=generation, loss=loss
    )


def test_nan_loss_in_a_report_faults_once_per_generation() -> None:
    clock = Clock()
    m = LossMonitor()
    m.start(context(clock))
    m.on_report(_report(0, 1, 2.0))
    m.on_report(_report(1, 7, float("nan")))
    m.on_report(_report(0, 7, float("inf")))
    [f] = m.poll(clock())
    assert f.kind is FaultKind.LOSS_NAN and f.action is Action.RESTART
    assert (f.rank, f.evidence["step"], f.evidence["source"]) == (11, 7, "report")
    assert (
        m.ctx is not None
        and m.ctx.registry.get_sample_value("stalwart_loss_nonfinite_total", {"rank": "10"}) == 1
    )


def test_printed_nan_is_caught_only_while_reports_carry_no_loss() -> None:
    clock = Clock()
    m = LossMonitor()
    m.start(context(clock))
    m.on_report(_report(0, 1, 2.0))
    m.on_line(0, "step 1 loss: nan")  # rank 0 reports its loss: lines are not read for it
    assert m.poll(clock()) == []
    m.on_line(1, "step 1 loss: nan")
    [f] = m.poll(clock())
    assert f.kind is FaultKind.LOSS_NAN and f.local_rank == 1 and f.evidence["source"] == "log"
    off = LossMonitor(LossConfig(from_logs=False))
    off.start(context(clock))
    off.on_line(0, "loss: nan")
    assert off.poll(clock()) == []


def test_spike_detector_flags_a_jump_but_not_noise() -> None:
    clock = Clock()
    m = LossMonitor(LossConfig(spike_action=Action.SKIP))
    m.start(context(clock))
    rng = random.Random(0)
    loss = 3.0
    for step in range(1, 400):
        loss *= 0.999
        m.on_report(_report(0, step, loss * (1 + rng.gauss(0, 0.02))))  # 2% noise, slow decrease
    assert m.poll(clock()) == []
    m.on_report(_report(0, 400, loss * 1.5))
    [f] = m.poll(clock())
    assert f.kind is FaultKind.LOSS_SPIKE and f.action is Action.SKIP
    assert f.evidence["zscore"] > 6
    m.on_report(_report(0, 401, loss * 1.5))  # the spike stayed out of the window: still a spike
    assert [x.kind for x in m.poll(clock())] == [FaultKind.LOSS_SPIKE]


def test_a_level_that_lasts_is_learned_and_a_restart_learns_the_level_again() -> None:
    # the window never took spikes in: after a lasting rise every later step was a spike, and
    # with spike_action=restart the job restarted until its budget was spent
    clock = Clock()
    m = LossMonitor(LossConfig(spike_action=Action.RESTART))
    m.start(context(clock))
    rng = random.Random(1)
    for step in range(1, 100):
        m.on_report(_report(0, step, 1.0 + rng.gauss(0, 0.01)))
    for step in range(100, 200):
        m.on_report(_report(0, step, 3.0 + rng.gauss(0, 0.03)))
    spikes = [f for f in m.poll(clock()) if f.kind is FaultKind.LOSS_SPIKE]
    assert len(spikes) == LossConfig().spike_min_samples  # then 3.0 is the level
    ctx = context(clock)
    ctx.generation = 1  # restarted, from an older checkpoint: back to 1.0
    m.start(ctx)
    for step in range(50, 80):
        m.on_report(_report(0, step, 1.0 + rng.gauss(0, 0.01), generation=1))
    assert m.poll(clock()) == []


def test_no_spike_verdict_before_min_samples_and_flat_windows_are_safe() -> None:
    assert robust_zscore(1.0, [1.0] * 30) == 0.0
    assert robust_zscore(1.01, [1.0] * 30) == pytest.approx(10.0)
    clock = Clock()
    m = LossMonitor()
    m.start(context(clock))
    for step in range(1, 19):
        m.on_report(_report(0, step, 1.0))
    m.on_report(_report(0, 19, 100.0))
    assert m.poll(clock()) == []


def test_stale_reports_from_an_earlier_generation_are_ignored() -> None:
    clock = Clock()
    m = LossMonitor()
    ctx = context(clock)
    ctx.generation = 2
    m.start(ctx)
    m.on_report(_report(0, 5, float("nan"), generation=1))
    assert m.poll(clock()) == []


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="window"):
        LossConfig(spike_window=1)
    with pytest.raises(ValueError, match="spike action"):
        LossConfig(spike_action=Action.REPLACE_NODE)


@pytest.mark.parametrize("reports", [True, False])
def test_a_real_worker_nan_is_caught_from_reports_or_printed_lines(node, reports: bool) -> None:
    m = LossMonitor()
    n = node(
        [m],
        nproc=2,
        args=["--step-time", "0.02", *([] if reports else ["--no-report"])],
        fault="nan:rank=1:step=5",
    )
    f = n.wait_fault(FaultKind.LOSS_NAN, timeout=20)
    assert f is not None
    assert f.rank == 1 and math.isnan(f.evidence["loss"])
    assert f.evidence["source"] == ("report" if reports else "log")
    if reports:
        assert f.evidence["step"] == 5
