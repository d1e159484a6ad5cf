"""``ExitWatcher``: a worker's exit reaches the agent when it happens, with its time."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from stalwart.agent.procs import ExitWatcher

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


# where pidfds are refused (old kernels, some seccomp filters, gVisor) the agent polls; the
# fallback has its own test below
needs_pidfd = pytest.mark.skipif(not ExitWatcher.supported(), reason="pidfd_open is refused here")


class _Exits:
    def __init__(self) -> None:
        self.seen: list[tuple[object, float]] = []
        self.event = threading.Event()

    def __call__(self, key: object, when: float) -> None:
        self.seen.append((key, when))
        self.event.set()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _start(procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(SLEEPER)
    procs.append(p)
    return p


@needs_pidfd
def test_reports_each_exit_with_its_time_and_only_the_process_that_exited(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    exits = _Exits()
    watcher = ExitWatcher(exits)
    try:
        assert watcher.available
        a, b = _start(procs), _start(procs)
        assert watcher.watch("a", a.pid) and watcher.watch("b", b.pid)
        killed_at = time.time()
        a.send_signal(signal.SIGKILL)
        assert exits.event.wait(10), "no exit reported"
        assert [key for key, _ in exits.seen] == ["a"]
        assert killed_at <= exits.seen[0][1] <= time.time()
        # not reaped by the watcher: the agent's own poll still gets the status
        assert a.wait(timeout=10) == -signal.SIGKILL
        assert b.poll() is None
        exits.event.clear()
        c = _start(procs)  # watched while the thread already waits: it must see the new one too
        assert watcher.watch("c", c.pid)
        c.terminate()
        assert exits.event.wait(10), "an exit of a process watched later was not reported"
        assert [key for key, _ in exits.seen] == ["a", "c"]
    finally:
        watcher.close()


@needs_pidfd
def test_a_process_already_reaped_counts_as_exited(procs: list[subprocess.Popen[bytes]]) -> None:
    exits = _Exits()
    watcher = ExitWatcher(exits)
    try:
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait(timeout=30)
        assert watcher.watch("gone", p.pid)
        assert [key for key, _ in exits.seen] == ["gone"]
    finally:
        watcher.close()


def test_without_pidfds_watch_says_so_and_nothing_is_reported(
    procs: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EPERM, "Operation not permitted")  # a seccomp filter's answer

    monkeypatch.setattr(os, "pidfd_open", refused)
    exits = _Exits()
    watcher = ExitWatcher(exits)
    try:
        p = _start(procs)
        assert not watcher.watch("p", p.pid)
        assert not watcher.available
        p.kill()
        p.wait(timeout=10)
        assert exits.seen == []  # nothing is registered: the agent's polling sees exits
    finally:
        watcher.close()


@needs_pidfd
def test_close_stops_the_thread_and_releases_every_descriptor(procs: list[subprocess.Popen[bytes]]) -> None:
    watcher = ExitWatcher(_Exits())
    for _ in range(3):
        assert watcher.watch("p", _start(procs).pid)
    fds = [watcher._wake_r, watcher._wake_w, *watcher._watched]
    links = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds}  # pipe:[inode], anon_inode:[pidfd]
    assert len(fds) == 5 and sorted(links.values()).count("anon_inode:[pidfd]") == 3
    thread = watcher._thread
    assert thread is not None and thread.is_alive()
    watcher.close()
    assert not thread.is_alive()
    # closed: the number is free, or another test's thread already holds something else there
    assert all(not _is_open(fd) or os.readlink(f"/proc/self/fd/{fd}") != links[fd] for fd in fds)
    assert not watcher.watch("late", _start(procs).pid)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_passing_pidfd_failure_leaves_that_process_to_polling_and_the_next_watched(
    procs: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pidfd_open
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def sometimes(pid: int, flags: int = 0) -> int:
        if failures:
            raise failures.pop()
        return real(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", sometimes)
    exits = _Exits()
    watcher = ExitWatcher(exits)
    try:
        assert not watcher.watch("first", _start(procs).pid)  # no exception: the worker starts
        assert watcher.available
        if ExitWatcher.supported():
            second = _start(procs)
            assert watcher.watch("second", second.pid)
            second.kill()
            assert exits.event.wait(10) and [key for key, _ in exits.seen] == ["second"]
    finally:
        watcher.close()
