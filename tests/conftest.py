"""Shared test fixtures (generic; keep them small and documented).

Fixtures:

* ``free_port``: a function returning a TCP port free on 127.0.0.1 right now.
* ``wait_for``: ``wait_for(predicate, timeout, what=...)`` polls with a deadline instead of sleeping.
* ``procs``: starts commands in their own session and kills every process group at teardown, so
  no test leaves processes behind even when it fails half way.
* ``stalwart``: a ``StalwartRunner`` for ``stalwart run`` jobs of ``tests/workers/ddp_tiny.py``.

``STALWART`` is the argv prefix that runs the CLI with this interpreter; ``loopback_env()`` is the
environment for processes that must keep their traffic on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

STALWART = [sys.executable, "-m", "stalwart.cli"]
WORKERS_DIR = Path(__file__).parent / "workers"


def _free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def loopback_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus settings that keep gloo on the loopback interface."""
    env = dict(os.environ)
    env.update({"GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.pop("STALWART_FAULT", None)
    env.update(extra)
    return env


def _kill_tree(p: subprocess.Popen[str]) -> None:
    try:
        tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    groups = {p.pid}
    for proc in tree:
        try:
            groups.add(os.getpgid(proc.pid))
        except ProcessLookupError:
            pass
    for pgid in groups:
        if pgid in (0, 1, os.getpgid(0)):
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a TCP port that is free on 127.0.0.1 now."""
    return _free_port


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``wait_for(predicate, timeout, interval=0.05, what="")``: poll until truthy, else fail."""
    return _wait_for


class Procs:
    """Starts processes in new sessions (``start``) and kills them all at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(
        self, argv: Sequence[str], env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            list(argv),
            env=env if env is not None else loopback_env(),
            stdout=kw.pop("stdout", subprocess.PIPE),
            stderr=kw.pop("stderr", subprocess.STDOUT),
            text=True,
            start_new_session=True,
            **kw,
        )
        self.started.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.started:
            _kill_tree(p)


@pytest.fixture
def procs() -> Iterator[Procs]:
    """A ``Procs`` whose processes (and their process groups) are killed when the test ends."""
    ps = Procs()
    try:
        yield ps
    finally:
        ps.cleanup()


class StalwartRunner:
    """Starts ``stalwart run`` jobs of the tiny test worker (``tests/workers/ddp_tiny.py``)."""

    def __init__(self, procs: Procs, tmp_path: Path) -> None:
        self.procs = procs
        self.tmp = tmp_path
        self.log_dir = tmp_path / "logs"
        self.ckpt = tmp_path / "ckpt.pt"
        self.progress = tmp_path / "progress"

    def tiny_args(self, steps: int, *extra: str) -> list[str]:
        """The worker script and its arguments (checkpoint and progress under tmp_path)."""
        return [
            str(WORKERS_DIR / "ddp_tiny.py"),
            "--steps",
            str(steps),
            "--ckpt",
            str(self.ckpt),
            "--progress-dir",
            str(self.progress),
            *extra,
        ]

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """``stalwart run --log-dir <tmp>/logs ARGS...``, output (stdout+stderr) piped as text."""
        return self.procs.start([*STALWART, "run", "--log-dir", str(self.log_dir), *args], env=env)

    def progress_of(self, rank: int) -> list[tuple[int, int]]:
        """(generation, step) pairs rank ``rank`` completed, in order."""
        path = self.progress / f"rank-{rank}.txt"
        if not path.exists():
            return []
        return [
            (int(g), int(s)) for g, s in (ln.split() for ln in path.read_text().splitlines() if ln.strip())
        ]

    def events(self) -> list[dict[str, Any]]:
        import json

        out = []
        for path in sorted(self.log_dir.glob("events-*.jsonl")):
            out.extend(json.loads(ln) for ln in path.read_text().splitlines() if ln.strip())
        return out


@pytest.fixture
def stalwart(procs: Procs, tmp_path: Path) -> StalwartRunner:
    """A ``StalwartRunner`` whose jobs are killed (process groups) when the test ends."""
    return StalwartRunner(procs, tmp_path)
