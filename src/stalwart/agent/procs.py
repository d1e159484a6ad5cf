"""Starting and stopping worker processes, and carrying their output.

Workers are started through one ``Launcher`` interface, implemented by the warm-standby pool
(``stalwart.agent.standby.StandbyPool``; size 0 starts every worker fresh).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
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
    "ExitWatcher",
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


class ExitWatcher:
    """Calls ``on_exit(key, when)`` from a thread of its own the moment a watched process exits.

    The agent's loop otherwise learns of an exit at its next poll, up to ``--monitor-interval``
    later (torchrun's default 0.1 s): a third of a whole restart here. One ``pidfd`` per process
    (Linux 5.3+), watched with ``poll(2)``; ``available`` is False where the kernel or a seccomp
    filter refuses pidfds, and the loop's polling alone then sees exits. A pidfd is taken while
    the process is an unreaped child of this one, so it can never name a recycled pid.
    """

    def __init__(self, on_exit: Callable[[object, float], None]) -> None:
        self._on_exit = on_exit
        self.available = hasattr(os, "pidfd_open") and hasattr(select, "poll")
        self._lock = threading.Lock()
        self._watched: dict[int, object] = {}  # pidfd -> key
        self._poller = select.poll() if self.available else None
        self._wake_r, self._wake_w = os.pipe() if self.available else (-1, -1)
        if self.available:
            os.set_blocking(self._wake_w, False)
        self._closed = False
        self._thread: threading.Thread | None = None
        if self._poller is not None:
            self._poller.register(self._wake_r, select.POLLIN)
            self._thread = threading.Thread(target=self._run, name="stalwart-exit-watcher", daemon=True)
            self._thread.start()

    @staticmethod
    def supported() -> bool:
        """Whether this kernel and its filters allow pidfds (a probe on this process)."""
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError):
            return False
        return True

    def watch(self, key: object, pid: int) -> bool:
        """Watch ``pid`` (a child not yet reaped); False where it cannot: the caller's polling
        sees that process's exit."""
        if self._poller is None or not self.available:
            return False
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already reaped: it exited
            self._on_exit(key, time.time())
            return True
        except OSError as exc:  # an optimisation only: never a reason to fail a worker's start
            if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                self.available = False  # refused for good (an old kernel, a seccomp filter)
            logger.debug("pidfd_open(%d) failed (%s): its exit is seen by polling", pid, exc)
            return False
        with self._lock:
            if self._closed:
                os.close(fd)
                return False
            self._watched[fd] = key
            self._poller.register(fd, select.POLLIN)
            self._interrupt()  # a poll() under way still waits on the descriptors it started with
        return True

    def _interrupt(self) -> None:
        """Wake the thread's poll() (called with the lock held, before close() closes the pipe)."""
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Stop the thread and forget every process."""
        with self._lock:
            if self._closed or self._poller is None:
                self._closed = True
                return
            self._closed = True
            self._interrupt()
        assert self._thread is not None
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():  # stuck in a callback: its descriptors go with the process
            logger.warning("the exit watcher did not stop; leaving its descriptors open")
            return
        for fd in self._watched:
            os.close(fd)
        self._watched.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        assert self._poller is not None
        while True:
            ready = self._poller.poll()
            when = time.time()
            exited: list[object] = []
            with self._lock:
                if self._closed:
                    return
                for fd, _ in ready:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                        continue
                    key = self._watched.pop(fd, None)
                    if key is None:
                        continue
                    self._poller.unregister(fd)
                    os.close(fd)
                    exited.append(key)
            for key in exited:
                try:
                    self._on_exit(key, when)
                except Exception:
                    logger.exception("exit callback failed")


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
