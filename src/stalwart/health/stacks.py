"""Evidence for hangs: worker stack dumps, process states and NCCL flight-recorder dumps.

Workers started by stalwart register ``faulthandler`` on ``STACK_DUMP_SIGNAL`` (all threads),
appending to ``stack_dump_path(dir, rank, pid)``. The handler runs in C inside the signal handler,
so it also dumps a process whose Python thread holds the GIL in a C call. It cannot dump a
stopped process (state ``T``): those are reported as stopped, with their kernel wait channel, and
dumped with ``py-spy`` when it is installed. A process that does not catch the signal is never
sent it: the signal's default action would kill it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stalwart.worker.api import STACK_DUMP_SIGNAL, stack_dump_path

__all__ = [
    "FLIGHT_RECORDER_SUBDIR",
    "StackDump",
    "catches_signal",
    "flight_recorder_env",
    "proc_state",
    "wait_channel",
]

logger = logging.getLogger(__name__)

FLIGHT_RECORDER_SUBDIR = "flight-recorder"
_FR_PREFIX = "nccl_trace_rank_"

_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "uninterruptible (D)",
    "T": "stopped",
    "t": "traced",
    "Z": "zombie",
    "X": "dead",
    "I": "idle",
}


def flight_recorder_env(log_dir: str) -> dict[str, str]:
    """Worker environment that makes NCCL's flight recorder dumpable on demand into the log dir.

    The agent adds these to the workers' environment (where the user has not set them). Writing to
    ``<prefix><rank>.pipe`` then makes ProcessGroupNCCL dump its trace to ``<prefix><rank>``.
    """
    prefix = os.path.join(log_dir, FLIGHT_RECORDER_SUBDIR, _FR_PREFIX)
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
        "TORCH_FR_DUMP_TEMP_FILE": prefix,  # the newer spelling
        "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": prefix,
    }


def proc_state(pid: int, proc: str = "/proc") -> str | None:
    """The one-letter scheduler state of ``pid`` (``R``, ``S``, ``D``, ``T``...), ``None`` if gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: the state follows the last ')'.
    end = data.rfind(b")")
    if end < 0 or end + 2 >= len(data):
        return None
    return chr(data[end + 2])


def wait_channel(pid: int, proc: str = "/proc") -> str:
    try:
        with open(f"{proc}/{pid}/wchan") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def catches_signal(pid: int, sig: int, proc: str = "/proc") -> bool:
    """True if ``pid`` has a handler for ``sig`` (``SigCgt`` in /proc/PID/status)."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


@dataclass
class _Target:
    local_rank: int
    rank: int
    pid: int
    state: str | None
    path: str
    size_before: int = 0
    signalled: bool = False
    pyspy: subprocess.Popen[bytes] | None = None
    pyspy_path: str = ""
    note: str = ""


@dataclass
class StackDump:
    """One round of evidence collection for a hang: ``request`` once, then poll ``done(now)``.

    ``evidence()`` lists, per rank, the process state and the dump file (or why there is none).
    """

    stack_dir: str
    log_dir: str
    timeout: float = 2.0
    proc: str = "/proc"
    pyspy: str | None = field(default_factory=lambda: shutil.which("py-spy"))
    targets: list[_Target] = field(default_factory=list)
    deadline: float = 0.0
    flight_recorder: list[str] = field(default_factory=list)

    def request(self, pids: Mapping[int, int], ranks: Mapping[int, int], now: float) -> None:
        """Signal every worker in ``pids`` (local rank -> pid) to dump its stacks."""
        os.makedirs(self.stack_dir, exist_ok=True)
        self.deadline = now + self.timeout
        for local_rank, pid in sorted(pids.items()):
            rank = ranks.get(local_rank, local_rank)
            t = _Target(
                local_rank, rank, pid, proc_state(pid, self.proc), stack_dump_path(self.stack_dir, rank, pid)
            )
            self.targets.append(t)
            if t.state is None or t.state in "ZX":
                t.note = "process has exited"
                continue
            if t.state in "Tt":
                t.note = f"process is {_STATES[t.state]} (e.g. SIGSTOP): it cannot dump its own stacks"
                self._start_pyspy(t)
                continue
            if not catches_signal(pid, STACK_DUMP_SIGNAL, self.proc):
                t.note = "worker has no stack-dump handler (not started by stalwart's bootstrap?)"
                self._start_pyspy(t)
                continue
            try:
                t.size_before = os.path.getsize(t.path)
            except OSError:
                t.size_before = 0
            try:
                os.kill(pid, STACK_DUMP_SIGNAL)
                t.signalled = True
            except OSError as exc:
                t.note = f"cannot signal: {exc}"
        self._trigger_flight_recorder()

    def _start_pyspy(self, t: _Target) -> None:
        if not self.pyspy:
            return
        t.pyspy_path = os.path.join(self.stack_dir, f"pyspy-rank{t.rank}-pid{t.pid}.txt")
        try:
            with open(t.pyspy_path, "wb") as out:
                t.pyspy = subprocess.Popen(
                    [self.pyspy, "dump", "--pid", str(t.pid)], stdout=out, stderr=subprocess.STDOUT
                )
        except OSError as exc:
            t.note += f"; py-spy failed: {exc}"

    def _trigger_flight_recorder(self) -> None:
        fr_dir = os.path.join(self.log_dir, FLIGHT_RECORDER_SUBDIR)
        for t in self.targets:
            pipe = os.path.join(fr_dir, f"{_FR_PREFIX}{t.rank}.pipe")
            if not os.path.exists(pipe):
                continue
            try:
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(fd, b"1\n")
                finally:
                    os.close(fd)
                self.flight_recorder.append(os.path.join(fr_dir, f"{_FR_PREFIX}{t.rank}"))
            except OSError as exc:  # ENXIO: nobody reads the pipe (the watchdog is gone)
                logger.info("flight recorder of rank %d not triggered: %s", t.rank, exc)

    def _dumped(self, t: _Target) -> bool:
        try:
            return os.path.getsize(t.path) > t.size_before
        except OSError:
            return False

    def done(self, now: float) -> bool:
        """True once every signalled worker wrote its dump (and py-spy ended), or at the deadline."""
        if now >= self.deadline:
            return True
        for t in self.targets:
            if t.signalled and not self._dumped(t) and proc_state(t.pid, self.proc) not in (None, "Z", "X"):
                return False
            if t.pyspy is not None and t.pyspy.poll() is None:
                return False
        return True

    def evidence(self) -> dict[str, Any]:
        """Per-rank states and dump paths; ends any py-spy still running."""
        out: dict[str, Any] = {}
        for t in self.targets:
            if t.pyspy is not None and t.pyspy.poll() is None:
                t.pyspy.kill()
                t.pyspy.wait(timeout=5)
                t.note += "; py-spy timed out"
            entry: dict[str, Any] = {
                "pid": t.pid,
                "state": _STATES.get(t.state or "X", t.state) if t.state else "exited",
            }
            if t.state in ("D", "T", "t", "S"):
                entry["wchan"] = wait_channel(t.pid, self.proc)
            if t.signalled:
                entry["stacks"] = t.path if self._dumped(t) else None
                if not self._dumped(t):
                    entry["note"] = "no dump within the wait (hung in a way faulthandler cannot reach?)"
            if t.pyspy_path:
                entry["pyspy"] = t.pyspy_path
            if t.note:
                entry["note"] = t.note.lstrip("; ")
            out[str(t.rank)] = entry
        return out

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.targets:
            key = (
                "dumped"
                if t.signalled and self._dumped(t)
                else ("stopped" if t.state in ("T", "t") else "missing")
            )
            counts[key] = counts.get(key, 0) + 1
        return counts
