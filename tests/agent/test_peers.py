"""``PeerRestarts`` over a real TCPStore: a node hears another node's restart, and nothing else."""

from __future__ import annotations

import os
import signal
import threading
import time
import types
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from torch.distributed import PrefixStore, TCPStore

from stalwart.agent.agent import StalwartAgent
from stalwart.agent.jobstore import JobStore
from stalwart.agent.peers import RESTART, PeerRestarts
from stalwart.errors import SignalReceived


def _server() -> TCPStore:
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


def _node(server: TCPStore) -> JobStore:
    js = JobStore("job")
    js._base = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
    return js


def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _watch(js: JobStore) -> tuple[PeerRestarts, threading.Event]:
    woken = threading.Event()
    return PeerRestarts(js.connect_apart, woken.set), woken


def test_a_restart_announced_by_another_node_wakes_this_one_for_that_generation_only() -> None:
    server = _server()
    me, other = _node(server), _node(server)
    peers, woken = _watch(me)
    try:
        peers.follow(4, me.wake_key(4, 1))
        other.announce(3, 2, RESTART)  # an older generation's news
        other.announce(4, 2, RESTART)
        assert woken.wait(10), "the announcement did not wake this node"
        assert peers.announced(4) and not peers.announced(3)
        woken.clear()
        peers.follow(5, me.wake_key(5, 1))  # the next round
        _until(lambda: peers._waiting == me.wake_key(5, 1), "the thread to wait on generation 5")
        other.announce(5, 2, b"end")  # the other node left for good: no restart
        _until(lambda: peers._waiting is None, "the thread to read generation 5's news")
        assert not woken.is_set() and not peers.announced(5)
        other.announce(6, 2, RESTART)
        peers.follow(6, me.wake_key(6, 1))
        assert woken.wait(10)
        assert peers.announced(6)
    finally:
        peers.close(lambda key: me.base.set(key, b"end"))


def test_close_releases_the_thread_blocked_in_the_store() -> None:
    server = _server()
    me = _node(server)
    peers, woken = _watch(me)
    peers.follow(0, me.wake_key(0, 0))
    _until(lambda: peers._waiting is not None, "the thread to wait on its key")
    thread = peers._thread
    assert thread is not None and thread.is_alive()
    peers.close(lambda key: me.base.set(key, b"end"))
    assert not thread.is_alive(), "the watch thread is still blocked in the store"
    assert not woken.is_set() and not peers.announced(0)


def test_no_thread_where_the_store_cannot_be_watched() -> None:
    js = JobStore("job")
    js.sync_generation(PrefixStore("job", _server()), 0, 1, fresh_round=False)  # static rounds
    peers, _ = _watch(js)
    peers.follow(0, js.wake_key(0, 0))
    thread = peers._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()  # connect_apart gave None: it ended at once
    peers.close(lambda key: None)


def test_a_failed_connect_is_tried_again_and_the_watch_then_hears_restarts() -> None:
    # torch's client connect to a healthy store stalls past its timeout now and then: one
    # failure must not leave the node deaf for the rest of the job
    server = _server()
    me, other = _node(server), _node(server)
    calls: list[int] = []

    def flaky_connect() -> TCPStore | None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("connect timed out (injected)")
        return me.connect_apart()

    woken = threading.Event()
    peers = PeerRestarts(flaky_connect, woken.set)
    try:
        peers.follow(2, me.wake_key(2, 0))
        other.announce(2, 2, RESTART)
        assert woken.wait(10), "no announcement heard after a failed connect"
        assert peers.announced(2) and len(calls) == 2
    finally:
        peers.close(lambda key: me.base.set(key, b"end"))


def test_a_leaving_node_does_not_hide_a_restart_already_announced() -> None:
    server = _server()
    restarting, leaving, me = _node(server), _node(server), _node(server)
    restarting.announce(7, 3, RESTART)
    leaving.announce(7, 3, b"end")  # it succeeded: "end" goes only where nothing was said
    assert me.restart_announced(7, 2) and me.base.get(me.wake_key(7, 2)) == RESTART
    leaving.announce(8, 3, b"end")
    assert not me.restart_announced(8, 2)


def test_a_signal_while_announcing_is_not_taken_for_a_store_failure() -> None:
    # _announce forgives store errors (the other nodes poll); a SIGTERM that lands while it
    # writes the wake keys must still stop the agent (forwarded to its workers)
    server = _server()
    js = _node(server)
    real = js.base

    class Signalled:  # the agent's handler raises SignalReceived in the middle of a write
        def set(self, key: str, value: bytes) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            real.set(key, value)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    js._base = Signalled()  # type: ignore[assignment]
    agent = types.SimpleNamespace(
        _generation=3, _worker_group=types.SimpleNamespace(group_world_size=2), _jobstore=js
    )
    previous = signal.signal(signal.SIGTERM, lambda s, f: StalwartAgent._on_signal(agent, s, f))  # type: ignore[arg-type]
    try:
        with pytest.raises(SignalReceived):
            StalwartAgent._announce(agent, RESTART)  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_end_wakes_a_watch_on_a_classic_tcpstore_too() -> None:
    # torch's non-libuv TCPStore (USE_LIBUV=0) does not wake a waiting client on compare_set
    server = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=False, timeout=timedelta(seconds=10)
    )
    me, leaving = JobStore("job"), JobStore("job")
    for js in (me, leaving):
        js._base = TCPStore(
            "127.0.0.1", server.port, is_master=False, use_libuv=False, timeout=timedelta(seconds=10)
        )
    peers, woken = _watch(me)
    try:
        peers.follow(1, me.wake_key(1, 0))
        _until(lambda: peers._waiting == me.wake_key(1, 0), "the thread to wait on its key")
        leaving.announce(1, 2, b"end")
        _until(lambda: peers._waiting is None, "the end to reach the waiting thread")
        assert not woken.is_set() and not peers.announced(1)
        me.announce(2, 2, RESTART)
        leaving.announce(2, 2, b"end")  # it left after the restart was said: that stays
        assert me.restart_announced(2, 1)
    finally:
        peers.close(lambda key: me.base.set(key, b"end"))
