"""``report()``: the training loop's one call into stalwart.

Cheap by design (a few microseconds): one JSON encode and one non-blocking ``sendto`` on a Unix
datagram socket. If the agent is not listening the report is dropped; training never blocks on it.
"""

from __future__ import annotations

import os
import socket
import time

from stalwart.worker import faults
from stalwart.worker.api import ENV_GENERATION, ENV_REPORT_SOCKET, Report

__all__ = ["report"]


class _Sender:
    def __init__(self) -> None:
        self.pid = -1
        self.sock: socket.socket | None = None
        self.path: str | None = None
        self.rank = 0
        self.local_rank = 0
        self.generation = 0

    def ensure(self) -> None:
        # Re-initialise after fork (warm standbys fork-free, but user code may fork).
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.generation = int(
            os.environ.get(ENV_GENERATION, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        )
        self.path = os.environ.get(ENV_REPORT_SOCKET) or None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self.sock = sock

    def send(self, rep: Report) -> None:
        if self.sock is None or self.path is None:
            return
        try:
            self.sock.sendto(rep.encode(), self.path)
        except OSError:
            pass  # agent gone, restarting, or its buffer full: progress reports are best effort


_sender = _Sender()


def report(step: int, loss: float | None = None, **metrics: float) -> float | None:
    """Tell the node's agent that ``step`` completed, with its loss and any scalar metrics.

    Call it once per optimizer step, after the loss is known (pass a Python float: ``loss.item()``).
    Returns the loss, possibly replaced by an injected fault (``STALWART_FAULT=nan:...``), so that
    scripts can print the returned value.
    """
    _sender.ensure()
    loss = faults.on_step(step, loss, _sender.rank)
    _sender.send(
        Report(
            rank=_sender.rank,
            local_rank=_sender.local_rank,
            step=step,
            time=time.time(),
            pid=_sender.pid,
            generation=_sender.generation,
            loss=loss,
            metrics={k: float(v) for k, v in metrics.items()} if metrics else {},
        )
    )
    return loss
