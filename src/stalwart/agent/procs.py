"""Starting and stopping worker processes, and carrying their output.

Workers are started through one ``Launcher`` interface, implemented by the warm-standby pool
(``stalwart.agent.standby.StandbyPool``; size 0 starts every worker fresh).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Protocol

from stalwart.agent.standby import LaunchSpec, StandbyPool

__all__ = [
    "LaunchSpec",  # re-exported from stalwart.agent.standby
    "Launcher",
    "OutputPump",
    "kill_group",
    "make_launcher",
    "stop_processes",
]

logger = logging.getLogger(__name__)


class Launcher(Protocol):
    """Starts workers: ``start()`` once, ``launch(spec)`` per worker, ``close()`` at exit."""

    def start(self) -> None: ...

    def launch(self, spec: LaunchSpec) -> subprocess.Popen[bytes]: ...

    def close(self) -> None: ...


def make_launcher(standby: int, preload: Sequence[str], env: Mapping[str, str]) -> Launcher:
    """The worker launcher: a pool of ``standby`` warm workers (0: every worker starts fresh).

    Fresh workers also go through the pool's bootstrap, so every worker gets the same set-up
    (PDEATHSIG, its own process group, the stack-dump handler) with or without standbys.
    """
    return StandbyPool(size=standby, preload=tuple(preload), env=dict(env))


def kill_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (workers lead their own); ignore if gone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], sig: int, grace: float) -> None:
    """Signal every process group, wait ``grace`` seconds, then SIGKILL; the final wait is bounded.

    A process in uninterruptible sleep (D state) cannot be reaped even by SIGKILL, so after a
    bounded wait it is logged and abandoned rather than blocking the agent.
    """
    live = [p for p in procs if p.poll() is None]
    for p in live:
        kill_group(p.pid, sig)
        kill_group(p.pid, signal.SIGCONT)  # a SIGSTOPped worker only acts on signals once continued
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        # Kill the group even if the leader exited: its children may still hold the pipes.
        kill_group(p.pid, signal.SIGKILL)
    for p in live:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("worker pid %d did not exit after SIGKILL (D state?); abandoning it", p.pid)


class OutputPump:
    """Carries one worker's stdout and stderr: to its log file, the console and a line callback.

    Lines reach ``on_line(local_rank, line)`` without their newline. The last ``tail`` lines of
    stderr are kept for failure summaries.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        local_rank: int,
        prefix: str,
        log_path: str,
        echo_out: bool,
        echo_err: bool,
        on_line: Callable[[int, str], None],
        console_lock: threading.Lock,
        tail: int = 60,
    ) -> None:
        self.local_rank = local_rank
        self.stderr_tail: deque[str] = deque(maxlen=tail)
        self._prefix = prefix
        self._on_line = on_line
        self._console_lock = console_lock
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed by the last reader thread)
        self._log_lock = threading.Lock()
        self._open = 2
        self._threads = [
            threading.Thread(target=self._read, args=(proc.stdout, sys.stdout, echo_out, False), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, sys.stderr, echo_err, True), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: IO[bytes] | None, console: Any, echo: bool, is_err: bool) -> None:
        if stream is None:
            self._done()
            return
        try:
            for raw in iter(stream.readline, b""):
                with self._log_lock:
                    self._log.write(raw)
                    self._log.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if is_err:
                    self.stderr_tail.append(line)
                if echo:
                    with self._console_lock:
                        console.write(f"{self._prefix} {line}\n")
                        console.flush()
                try:
                    self._on_line(self.local_rank, line)
                except Exception:
                    logger.exception("on_line handler failed")
        except (OSError, ValueError):
            pass
        finally:
            stream.close()
            self._done()

    def _done(self) -> None:
        with self._log_lock:
            self._open -= 1
            if self._open == 0:
                self._log.close()

    def join(self, timeout: float) -> None:
        """Wait (bounded) until both streams reached EOF."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
