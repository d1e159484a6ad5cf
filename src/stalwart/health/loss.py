"""Loss anomalies: NaN/Inf losses, and spikes by a robust z-score over a window.

Sources: ``report(step, loss=...)``, and for scripts that only print their loss, output lines such
as ``loss: nan``, ``loss=1.23``, ``loss 4.5`` or ``'loss': inf`` (no configuration needed). Lines
are used for a rank only while it sends no loss in its reports, so nothing is counted twice.

Spike defaults follow OLMo-core's skip-step optimizer: a window of 128 losses, a threshold of 6
robust standard deviations (``1.4826 x MAD``), and no verdict before 20 samples. A spike is left
out of the window, so a run of spikes stays visible. The default action is ``warn``; ``skip``
(the agent records it; a script may skip the batch) and ``restart`` are the alternatives.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from stalwart.health.api import Action, Fault, FaultKind, MonitorContext
from stalwart.health.base import MonitorBase
from stalwart.worker.api import Report

__all__ = ["LOSS_LINE", "LossConfig", "LossMonitor", "parse_loss_line", "robust_zscore"]

# "loss" not preceded by a letter (train_loss, lm loss), then optional quote, separator, quote.
LOSS_LINE = re.compile(
    r"""(?<![A-Za-z])loss['"]?\s*[:=]?\s*['"]?(?:tensor\()?"""
    r"""([-+]?(?:nan|inf(?:inity)?|\d+\.?\d*(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?))(?![\w.])""",
    re.IGNORECASE,
)

# An evaluation's metric, named so anywhere up its key: eval_loss, val/loss, "test loss",
# valid_nll_loss, eval_mlm_loss. It is not the training curve.
_EVALUATION_KEY = re.compile(r"(?:^|[^\w/])(?:eval|val|valid|validation|test)[_/ ][\w/]*$", re.IGNORECASE)
# A line that reports an evaluation as a whole: fairseq's "| valid on 'valid' subset | loss 3.9",
# torchtitan's "validate step: 100  loss: 3.9"
_EVALUATION_LINE = re.compile(
    r"\b(?:valid|validation|eval|evaluation|test) on '|\bvalidat(?:e|es|ing|ion)\b|\bevaluat(?:e|ing|ion)\b",
    re.IGNORECASE,
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes (torchtitan colours its metrics)
_MAD_TO_SIGMA = 1.4826


def parse_loss_line(line: str) -> float | None:
    """The loss value printed on ``line``, or ``None``."""
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    for m in LOSS_LINE.finditer(line):
        if _EVALUATION_LINE.search(line, 0, m.start()):
            return None
        if _EVALUATION_KEY.search(line, 0, m.start()):
            continue  # an evaluation's metric; the training loss may follow on the line
        try:
            return float(m.group(1))
        except ValueError:
            return None
    return None


def robust_zscore(value: float, window: list[float] | deque[float]) -> float:
    """``(value - median) / (1.4826 x MAD)``, with a small floor on the MAD for flat windows."""
    med = statistics.median(window)
    mad = statistics.median(abs(x - med) for x in window)
    scale = max(_MAD_TO_SIGMA * mad, 1e-3 * abs(med), 1e-12)
    return (value - med) / scale


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Loss-anomaly settings (see the module docstring for the defaults)."""

    nan_action: Action = Action.RESTART
    spike_action: Action = Action.WARN
    spike_window: int = 128
    spike_sigma: float = 6.0
    spike_min_samples: int = 20
    from_logs: bool = True

    def __post_init__(self) -> None:
        if self.spike_window < 2:
            raise ValueError(f"loss spike window must be >= 2, got {self.spike_window}")
        if self.spike_sigma <= 0:
            raise ValueError(f"loss spike sigma must be > 0, got {self.spike_sigma}")
        if not 2 <= self.spike_min_samples <= self.spike_window:
            raise ValueError("loss spike min samples must be between 2 and the window")
        if self.spike_action not in (Action.IGNORE, Action.WARN, Action.SKIP, Action.RESTART):
            raise ValueError(
                f"loss spike action must be ignore, warn, skip or restart, not {self.spike_action}"
            )


class LossMonitor(MonitorBase):
    """One ``LOSS_NAN`` fault per generation; a ``LOSS_SPIKE`` fault per spike."""

    name = "loss"

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()
        self._windows: dict[int, deque[float]] = {}
        self._spikes: dict[int, list[float]] = {}  # each rank's spikes in a row, newest last
        self._reporting: set[int] = set()  # ranks whose reports carry a loss this generation
        self._nan_fired = False

    def _on_start(self, ctx: MonitorContext) -> None:
        # A restarted generation resumes from a checkpoint, maybe an older one than the steps the
        # window saw: its level is learned again (a window that survived flagged every step of a
        # new level, and with spike_action=restart, restarted until the budget was spent).
        self._windows = {}
        self._spikes = {}
        self._reporting = set()
        self._nan_fired = False

    def _report(self, report: Report) -> None:
        if report.loss is None:
            return
        with self._lock:
            if not self._current(report):
                return
            self._reporting.add(report.local_rank)
            self._observe(report.rank, report.local_rank, report.loss, report.step, "report")

    def _line(self, local_rank: int, line: str) -> None:
        if not self.config.from_logs or "oss" not in line:  # cheap pre-filter (Loss, loss)
            return
        value = parse_loss_line(line)
        if value is None:
            return
        with self._lock:
            if not self.running or local_rank in self._reporting:
                return
            rank = self._global_rank(local_rank)
            self._observe(rank if rank is not None else local_rank, local_rank, value, None, "log", line)

    def _observe(
        self, rank: int, local_rank: int, loss: float, step: int | None, source: str, line: str = ""
    ) -> None:
        label = str(rank)
        evidence: dict[str, Any] = {"loss": loss, "step": step, "source": source}
        if line:
            evidence["line"] = line.rstrip()[:500]
        if not math.isfinite(loss):
            if self.metrics is not None:
                self.metrics.loss_nonfinite.labels(rank=label).inc()
            if not self._nan_fired:
                self._nan_fired = True
                at = f" at step {step}" if step is not None else ""
                self._fault(
                    FaultKind.LOSS_NAN,
                    self.config.nan_action,
                    f"rank {rank} loss is {loss}{at}",
                    evidence,
                    rank,
                    local_rank,
                )
            return
        if self.metrics is not None:
            self.metrics.loss.labels(rank=label).set(loss)
        window = self._windows.setdefault(rank, deque(maxlen=self.config.spike_window))
        if len(window) >= self.config.spike_min_samples:
            z = robust_zscore(loss, window)
            if self.metrics is not None:
                self.metrics.loss_zscore.labels(rank=label).set(z)
            if z > self.config.spike_sigma:
                if self.metrics is not None:
                    self.metrics.loss_spikes.labels(rank=label).inc()
                evidence.update(
                    zscore=round(z, 2),
                    window_median=statistics.median(window),
                    window_size=len(window),
                    sigma=self.config.spike_sigma,
                )
                if self.config.spike_action is not Action.IGNORE:
                    self._fault(
                        FaultKind.LOSS_SPIKE,
                        self.config.spike_action,
                        f"rank {rank} loss spiked to {loss:.4g} ({z:.1f} robust sigmas above the median "
                        f"{statistics.median(window):.4g} of the last {len(window)})",
                        evidence,
                        rank,
                        local_rank,
                    )
                spikes = self._spikes.setdefault(rank, [])
                spikes.append(loss)
                if len(spikes) >= self.config.spike_min_samples:
                    # a level that lasts is the new normal, not a run of spikes: learn it
                    window.clear()
                    window.extend(spikes)
                    spikes.clear()
                return  # keep a spike out of the window
        self._spikes.pop(rank, None)
        window.append(loss)

    def _fault(
        self,
        kind: FaultKind,
        action: Action,
        message: str,
        evidence: dict[str, Any],
        rank: int,
        local_rank: int,
    ) -> None:
        self._emit(
            Fault(
                kind=kind,
                action=action,
                message=message,
                evidence=evidence,
                rank=rank,
                local_rank=local_rank,
                node=self._node(),
                source=self.name,
                observed_at=self._now(),
            )
        )
