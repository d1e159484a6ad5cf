"""``report()``: the training loop's one call into stalwart.

Cheap by design (about 5 µs): the JSON record is formatted by hand around a prefix built once
per process, and sent with one non-blocking ``sendto`` on a Unix datagram socket. If the agent is
not listening the report is dropped; training never blocks on it. ``bench/detection.py`` measures
the cost per call.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import socket
import threading
import time
from typing import Any

from stalwart.worker import faults
from stalwart.worker.api import ENV_GENERATION, ENV_REPORT_SOCKET, METRIC_BUSY, METRIC_EXITING, Report

__all__ = ["busy", "event", "report"]


class _Sender:
    def __init__(self) -> None:
        self.pid = -1
        self.sock: socket.socket | None = None
        self.path: str | None = None
        self.rank = 0
        self.local_rank = 0
        self.generation = 0
        self.prefix = ""
        self.last_step = 0
        self.atexit_pid = -1
        self.lock = threading.Lock()

    def ensure(self) -> None:
        # Re-initialise after fork (user code may fork). The checkpointer's threads send events
        # too, so the first call is made under a lock; later calls only compare the pid.
        if self.pid == os.getpid():
            return
        with self.lock:
            if self.pid != os.getpid():
                self._init()

    def _init(self) -> None:
        pid = os.getpid()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.generation = int(
            os.environ.get(ENV_GENERATION, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        )
        # The fields that never change in this process, in Report's wire format (see Report.decode).
        self.prefix = (
            f'{{"rank":{self.rank},"local_rank":{self.local_rank},"pid":{pid},"generation":{self.generation},'
        )
        self.path = os.environ.get(ENV_REPORT_SOCKET) or None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self.sock = sock
            if self.atexit_pid != pid:
                self.atexit_pid = pid
                atexit.register(_on_exit)
        self.pid = pid  # last: other threads use the fields once the pid matches

    def send(self, step: int, loss: float | None, metrics: dict[str, float]) -> None:
        if self.sock is None or self.path is None:
            return
        if loss is None:
            loss_text = "null"
        elif math.isfinite(loss):
            loss_text = repr(loss)
        else:
            loss_text = f'"{loss!r}"'  # JSON has no NaN/Inf: Report.decode turns the string back
        metrics_text = json.dumps(metrics, separators=(",", ":")) if metrics else "{}"
        data = (
            f'{self.prefix}"step":{step},"time":{time.time()!r},"loss":{loss_text},"metrics":{metrics_text}}}'
        )
        self.send_raw(data.encode())

    def send_raw(self, data: bytes) -> None:
        if self.sock is None or self.path is None:
            return
        try:
            self.sock.sendto(data, self.path)
        except OSError:
            pass  # agent gone, restarting, or its buffer full: reports and events are best effort


_sender = _Sender()
# a fork while another thread held the lock would leave the child's copy locked forever
os.register_at_fork(after_in_child=lambda: setattr(_sender, "lock", threading.Lock()))


def report(step: int, loss: float | None = None, **metrics: float) -> float | None:
    """Tell the node's agent that ``step`` completed, with its loss and any scalar metrics.

    Call it once per optimizer step, after the loss is known (pass a Python float: ``loss.item()``).
    ``step_time=SECONDS`` (compute time of the step, excluding waits in collectives) lets the agent
    find stragglers in synchronous jobs, where every rank's step interval is the same.
    Returns the loss, possibly replaced by an injected fault (``STALWART_FAULT=nan:...``), so that
    scripts can print the returned value.
    """
    _sender.ensure()
    if faults.active():
        loss = faults.on_step(step, loss, _sender.rank)
    if metrics:
        metrics = {k: float(v) for k, v in metrics.items()}  # NaN is sent as a bare token; decode accepts it
    _sender.last_step = int(step)
    _sender.send(int(step), None if loss is None else float(loss), metrics)
    return loss


def busy(seconds: float) -> None:
    """Tell the agent that the next ``report`` may take up to ``seconds`` (not a hang).

    Call it before a long phase inside the training loop: a blocking checkpoint save, an
    evaluation, the final save after the last step. The hang monitor waits that long (or its
    learned timeout, whichever is longer) before it declares a hang.
    """
    _sender.ensure()
    _sender.send(_sender.last_step, None, {METRIC_BUSY: float(seconds)})


def event(name: str, **fields: Any) -> None:
    """Tell the agent that ``name`` happened in this worker (``checkpoint_saved``, ...).

    The agent adds it to its event log (``stalwart job events``, incident timelines) and counts
    it in its metrics; it is not progress. ``fields`` must be JSON-able (others are sent as
    strings); keep them small: one datagram carries the event. Best effort, like ``report``.
    """
    _sender.ensure()
    if _sender.sock is None or _sender.path is None:
        return
    record = Report(
        rank=_sender.rank,
        local_rank=_sender.local_rank,
        step=_sender.last_step,
        time=time.time(),
        pid=_sender.pid,
        generation=_sender.generation,
        event={**fields, "event": name},
    )
    _sender.send_raw(record.encode())


def _on_exit() -> None:
    # Interpreter shutdown (torch and NCCL teardown can take seconds) is not a hang.
    if _sender.pid == os.getpid():
        _sender.send(_sender.last_step, None, {METRIC_EXITING: 1.0})
