"""Warm standby workers: pre-started processes that have already imported torch.

A restart with plain torchrun pays a fresh interpreter's ``import torch`` and, at DDP construction,
``import torch._dynamo`` (about 1.6 s of its 2 s on our machines). ``StandbyPool`` keeps ``size``
``python -u -m stalwart.worker.bootstrap`` processes per node that did those imports ahead of time and
promotes one to a worker on ``launch``; the pool then refills in the background.

Start the pool with the workers' base environment (``env``): what the interpreter and torch read at
start-up is fixed in a standby (``stalwart.worker.bootstrap.import_sensitive_env``), so a spec that
differs there gets a fresh process (logged once as a warning). Per-rank variables are free to differ.

Every process the pool starts is its own process-group leader and dies with the agent
(``PR_SET_PDEATHSIG``, set by the bootstrap). The kernel sends that signal when the *thread* that
forked the child exits, so all processes are forked from one daemon thread that lives as long as the
agent process.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stalwart.errors import ConfigError
from stalwart.worker.bootstrap import FrameDecoder, encode_frame, import_sensitive_env

__all__ = ["LaunchSpec", "StandbyPool"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_MAX_START_FAILURES = 3
"""Standbys that die before ready, in a row, after which the pool stops starting them."""


@dataclass(frozen=True)
class LaunchSpec:
    """What to run in one worker process, and with which environment.

    ``entrypoint`` is a script path, a module name when ``module`` is true, or a program when
    ``no_python`` is true (torchrun's ``--no-python``). ``env`` is the worker's complete environment.
    """

    entrypoint: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    module: bool = False
    no_python: bool = False

    def to_message(self) -> dict[str, Any]:
        """The JSON message the bootstrap reads (see ``stalwart.worker.bootstrap``)."""
        return {
            "entrypoint": self.entrypoint,
            "args": list(self.args),
            "env": dict(self.env),
            "cwd": self.cwd,
            "module": self.module,
            "no_python": self.no_python,
        }


class _Spawner:
    """Runs callables on one long-lived daemon thread (the parent thread for PR_SET_PDEATHSIG)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="stalwart-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, fut = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def call(self, fn: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], _T]) -> Future[_T]:
        fut: Future[_T] = Future()
        self._queue.put((fn, fut))
        return fut


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _get_spawner() -> _Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
        return _spawner


class _State(enum.Enum):
    """Life of one standby: STARTING (importing) -> READY -> PROMOTED, or DEAD from either."""

    STARTING = "starting"
    READY = "ready"
    PROMOTED = "promoted"
    DEAD = "dead"


@dataclass(eq=False)
class _Standby:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    sensitive_env: dict[str, str]
    started_at: float
    state: _State = _State.STARTING
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    ready_info: dict[str, Any] = field(default_factory=dict)


class _PoolState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class StandbyPool:
    """Keeps ``size`` warm standby processes and turns them into workers on ``launch``.

    Args:
        size: standbys to keep; 0 disables them (every launch starts a fresh process).
        preload: extra modules each standby imports (the user's heavy imports); an import error
            is logged and the worker imports the module itself.
        env: environment the standbys start with (default ``os.environ``). Variables read at
            import time must equal the workers' (see ``stalwart.worker.bootstrap``); a spec whose
            values differ gets a fresh process instead of a standby.
        python: the interpreter to run.
        refill_delay: seconds to wait after promoting a ready standby before starting its
            replacement, so that the replacement's imports (~2 s of CPU) do not compete with the new
            workers' first step, which is what a recovery waits for. On 2 cores refilling at once
            made the first DDP step 0.42 s instead of 0.09 s in one run (``bench/standby.py``).

    Example::

        pool = StandbyPool(2, preload=["transformers"], env=worker_env)
        pool.start()
        proc = pool.launch(LaunchSpec("train.py", ("--lr", "0.1"), env=rank_env, cwd=os.getcwd()))
        ...
        pool.close()
    """

    def __init__(
        self,
        size: int,
        preload: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        refill_delay: float = 1.0,
    ) -> None:
        if size < 0:
            raise ConfigError(f"standby pool size must be >= 0, got {size}; use 0 to disable standbys")
        bad = [m for m in preload if not m or not all(p.isidentifier() for p in m.split("."))]
        if bad:
            raise ConfigError(
                f"standby preload {bad[0]!r} is not a module name; pass dotted names like 'numpy'"
            )
        self.size = size
        self.preload = tuple(preload)
        self.env = dict(os.environ if env is None else env)
        self.python = python
        self.refill_delay = refill_delay
        self._sensitive_env = import_sensitive_env(self.env)
        self._lock = threading.RLock()
        self._spawned = threading.Condition(self._lock)  # notified when _pending drops
        self._state = _PoolState.NEW
        self._standbys: list[_Standby] = []
        self._pending = 0  # spawns queued on the spawner thread, not yet in _standbys
        self._failures = 0
        self._timers: list[threading.Timer] = []
        self._warned: set[tuple[str, ...]] = set()

    def __enter__(self) -> StandbyPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start standbys until ``size`` exist; returns at once (they import in the background)."""
        with self._lock:
            if self._state is _PoolState.CLOSED:
                raise RuntimeError("StandbyPool.start() after close()")
            self._state = _PoolState.RUNNING
        self._refill()

    def ready_count(self) -> int:
        """Standbys that finished their imports and wait for a spec."""
        with self._lock:
            self._poll()
            return sum(1 for s in self._standbys if s.state is _State.READY)

    def launch(self, spec: LaunchSpec) -> subprocess.Popen[bytes]:
        """Start a worker for ``spec``: a promoted standby if one fits, else a fresh process.

        Preference: a ready standby, then one still importing (it is further along than a fresh
        process), then a fresh bootstrap. The returned process has ``stdout``/``stderr`` pipes, is
        its own process-group leader, has stdin on /dev/null and dies with this process.
        """
        if not os.path.isdir(spec.cwd):
            raise ConfigError(f"worker cwd {spec.cwd!r} is not a directory; pass an existing directory")
        if not spec.entrypoint:
            raise ConfigError("worker entrypoint is empty; pass a script, a module (-m) or a program")
        message = encode_frame(spec.to_message())
        while True:
            with self._lock:
                if self._state is _PoolState.CLOSED:
                    raise RuntimeError("StandbyPool.launch() after close()")
                self._poll()
                standby = self._pick(spec)
                if standby is not None:
                    was_ready = standby.state is _State.READY
                    standby.state = _State.PROMOTED
                    self._standbys.remove(standby)
            if standby is None:
                break
            try:
                standby.sock.setblocking(True)
                standby.sock.sendall(message)
            except OSError as exc:
                logger.warning("standby pid %d is gone (%s); trying the next one", standby.proc.pid, exc)
                self._kill(standby)
                continue
            standby.sock.close()
            logger.debug("promoted standby pid %d for %s", standby.proc.pid, spec.entrypoint)
            # A recovery (ready standbys) waits for the new workers' first step: refill a little
            # later. At a job's first start (standbys still importing) there is no such window, and
            # the sooner the replacements import, the sooner the next failure finds them ready.
            self._refill(delay=self.refill_delay if was_ready else 0.0)
            return standby.proc
        fresh = _get_spawner().call(lambda: self._spawn(spec.env, spec.cwd, fresh=True))
        # If the process already died (a broken interpreter), its exit status tells the caller.
        with contextlib.suppress(OSError):
            fresh.sock.sendall(message)
        fresh.sock.close()
        logger.debug("started fresh worker pid %d for %s", fresh.proc.pid, spec.entrypoint)
        self._refill()
        return fresh.proc

    def close(self) -> None:
        """Kill the standbys not yet promoted (their process groups) and reap them, bounded.

        A standby whose spawn is in flight on the spawner thread is killed there as it arrives;
        close() waits for that too (bounded), so no standby outlives the call.
        """
        with self._lock:
            self._state = _PoolState.CLOSED
            standbys, self._standbys = self._standbys, []
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()
        for s in standbys:
            self._kill(s, wait=False)
        deadline = time.monotonic() + 5.0
        for s in standbys:
            self._reap(s, deadline)
        if threading.current_thread() is not _get_spawner()._thread:
            with self._lock:
                self._spawned.wait_for(
                    lambda: self._pending == 0, timeout=max(deadline - time.monotonic(), 0.05)
                )

    # -- internals ---------------------------------------------------------------------------

    def _pick(self, spec: LaunchSpec) -> _Standby | None:
        wanted_env = import_sensitive_env(spec.env)
        if wanted_env != self._sensitive_env:
            keys = tuple(_diff_keys(wanted_env, self._sensitive_env))
            if self.size and keys not in self._warned:
                self._warned.add(keys)
                logger.warning(
                    "launching fresh workers instead of standbys: the workers' import-time "
                    "environment differs from the standbys' in %s; start the pool with the "
                    "workers' values (see stalwart.worker.bootstrap)",
                    ", ".join(keys),
                )
            return None
        for wanted in (_State.READY, _State.STARTING):
            for s in self._standbys:
                if s.state is wanted:
                    return s
        return None

    def _poll(self) -> None:
        """Update standby states from their control sockets and exit status (lock held)."""
        died = False
        for s in list(self._standbys):
            if s.state is _State.STARTING:
                self._read_ready(s)
            if s.proc.poll() is not None:
                died = True
                self._standbys.remove(s)
                self._on_death(s)
        if died:
            self._refill()

    def _read_ready(self, s: _Standby) -> None:
        try:
            data = s.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return  # EOF: the process is exiting; poll() will see it
        try:
            frames = s.decoder.feed(data)
        except ValueError as exc:
            logger.warning("standby pid %d sent a malformed ready message (%s); killing it", s.proc.pid, exc)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(s.proc.pid, signal.SIGKILL)
            return
        for frame in frames:
            if frame.get("ready"):
                s.state = _State.READY
                s.ready_info = frame
                self._failures = 0
                logger.debug("standby pid %d ready after %.2fs", s.proc.pid, time.monotonic() - s.started_at)
                for mod, err in frame.get("errors", {}).items():
                    logger.warning("standby could not preload %r: %s", mod, err)

    def _on_death(self, s: _Standby) -> None:
        was_ready = s.state is _State.READY
        s.state = _State.DEAD
        s.sock.close()
        err = b""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
            _, err = s.proc.communicate(timeout=1.0)
        if was_ready:
            logger.warning("standby pid %d exited with %s while waiting", s.proc.pid, s.proc.returncode)
            return
        self._failures += 1
        logger.warning(
            "standby pid %d exited with %s during start-up:\n%s",
            s.proc.pid,
            s.proc.returncode,
            err.decode(errors="replace")[-4000:],
        )
        if self._failures == _MAX_START_FAILURES:
            logger.error(
                "%d standbys in a row died during start-up; not starting more (each launch now "
                "starts a fresh process). Fix the error above or run with standbys disabled.",
                self._failures,
            )

    def _refill(self, delay: float = 0.0) -> None:
        if delay > 0:
            timer = threading.Timer(delay, self._refill)
            timer.daemon = True
            with self._lock:
                if self._state is not _PoolState.RUNNING:
                    return
                self._timers = [t for t in self._timers if t.is_alive()]
                self._timers.append(timer)
            timer.start()
            return
        with self._lock:
            if self._state is not _PoolState.RUNNING or self._failures >= _MAX_START_FAILURES:
                return
            missing = self.size - len(self._standbys) - self._pending
            self._pending += max(missing, 0)
        spawner = _get_spawner()
        for _ in range(missing):
            spawner.submit(self._spawn_standby)

    def _spawn_standby(self) -> None:
        """On the spawner thread: start one standby and add it to the pool (or kill it if closed)."""
        with self._lock:
            if self._state is not _PoolState.RUNNING:
                self._spawn_done()
                return
        try:
            standby = self._spawn(self.env, None, fresh=False)
        except Exception:
            logger.exception("could not start a standby worker")
            with self._lock:
                self._failures += 1
                self._spawn_done()
            return
        standby.sock.setblocking(False)
        with self._lock:
            if self._state is _PoolState.RUNNING:
                self._standbys.append(standby)
                self._spawn_done()
                return
        self._kill(standby)
        with self._lock:
            self._spawn_done()

    def _spawn_done(self) -> None:
        """One queued spawn finished (lock held)."""
        self._pending -= 1
        self._spawned.notify_all()

    def _spawn(self, env: Mapping[str, str], cwd: str | None, fresh: bool) -> _Standby:
        """Start a bootstrap process (must run on the spawner thread, see the module docstring)."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [self.python, "-u", "-m", "stalwart.worker.bootstrap"]
        cmd += ["--control-fd", str(child_sock.fileno()), "--parent-pid", str(os.getpid())]
        if fresh:
            cmd.append("--fresh")
        else:
            for mod in self.preload:
                cmd += ["--preload", mod]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,  # a standby may wait for hours; it must not share a tty
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(env),
                cwd=cwd,
                pass_fds=(child_sock.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        return _Standby(proc, parent_sock, import_sensitive_env(env), time.monotonic())

    def _kill(self, s: _Standby, wait: bool = True) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(s.proc.pid, signal.SIGKILL)
        s.sock.close()
        if wait:
            self._reap(s, time.monotonic() + 5.0)

    @staticmethod
    def _reap(s: _Standby, deadline: float) -> None:
        # Bounded: a process in uninterruptible sleep (D state) cannot be reaped even by SIGKILL.
        try:
            s.proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            logger.warning("standby pid %d did not exit after SIGKILL; leaving it", s.proc.pid)
        for pipe in (s.proc.stdout, s.proc.stderr):
            if pipe is not None:
                pipe.close()


def _diff_keys(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
