"""A minimal stand-in for the agent's side of the monitor contract, over real worker processes.

``Node`` starts workers in their own sessions, receives their reports on a real Unix socket
(``ReportReceiver``), feeds every output line to the monitors from reader threads, and polls the
monitors like the agent loop does. ``close()`` kills every process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from stalwart.health.api import Fault, FaultKind, Monitor, MonitorContext
from stalwart.worker.api import (
    ENV_FAULT,
    ENV_FAULT_MARKER_DIR,
    ENV_GENERATION,
    ENV_REPORT_SOCKET,
    ENV_STACK_DIR,
    Report,
)
from stalwart.worker.channel import ReportReceiver

WORKER = str(Path(__file__).with_name("steps_worker.py"))


class Node:
    """``nproc`` workers running ``steps_worker.py args``, watched by ``monitors``."""

    def __init__(
        self,
        tmp: Path,
        monitors: Sequence[Monitor],
        nproc: int = 2,
        args: Sequence[str] = (),
        fault: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.tmp = tmp
        self.monitors = list(monitors)
        self.nproc = nproc
        self.args = list(args)
        self.fault = fault
        self.registry = registry or CollectorRegistry()
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.faults: list[Fault] = []
        self.reports: list[Report] = []
        self.lines: list[tuple[int, str]] = []
        self.receiver = ReportReceiver(str(tmp / "reports.sock"), self._on_report)
        self._threads: list[threading.Thread] = []
        self.ctx: MonitorContext | None = None

    def _on_report(self, report: Report) -> None:
        self.reports.append(report)
        for m in self.monitors:
            m.on_report(report)

    def _read(self, local_rank: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append((local_rank, line))
            for m in self.monitors:
                m.on_line(local_rank, line)

    def start(self) -> Node:
        self.receiver.start()
        env = dict(os.environ)
        env.update(
            {
                ENV_REPORT_SOCKET: self.receiver.path,
                ENV_STACK_DIR: str(self.tmp / "stacks"),
                ENV_FAULT_MARKER_DIR: str(self.tmp / "faults"),
                ENV_GENERATION: "0",
                ENV_FAULT: self.fault,
                "PYTHONUNBUFFERED": "1",
            }
        )
        for lr in range(self.nproc):
            env_r = dict(env, RANK=str(lr), LOCAL_RANK=str(lr), WORLD_SIZE=str(self.nproc))
            proc = subprocess.Popen(
                [sys.executable, WORKER, *self.args],
                env=env_r,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            self.procs[lr] = proc
        self.ctx = MonitorContext(
            node="node0",
            local_world_size=self.nproc,
            global_ranks={lr: lr for lr in range(self.nproc)},
            worker_pids={lr: p.pid for lr, p in self.procs.items()},
            log_dir=str(self.tmp),
            registry=self.registry,
        )
        for m in self.monitors:
            m.start(self.ctx)
        for lr, p in self.procs.items():
            t = threading.Thread(target=self._read, args=(lr, p), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def poll(self) -> list[Fault]:
        now = time.time()
        new = [f for m in self.monitors for f in m.poll(now)]
        self.faults += new
        return new

    def wait_fault(self, kind: FaultKind | None, timeout: float) -> Fault | None:
        """Poll every 0.05 s (the agent polls every 0.1 s) until a fault of ``kind`` or the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in self.poll():
                if kind is None or f.kind is kind:
                    return f
            time.sleep(0.05)
        return None

    def close(self) -> None:
        for m in self.monitors:
            m.stop()
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()
        self.receiver.stop()
