"""``PeerRestarts``: a node hears at once that another node restarts out of its generation.

A node that restarts its workers (or hands itself over) writes ``restart`` under every node's
wake key of the generation it leaves (``JobStore.announce``). Without this, the other nodes
learn of it only when their own workers fail on the broken collective (NCCL's may hang until its
timeout, minutes) or at their next ``--monitor-interval`` poll of the rendezvous (and only once
the restarting node has stopped its workers and joined the next round). Here a thread blocks in
the store's ``wait`` on this node's key, on a connection of its own (a waiting client blocks its
connection), and wakes the agent's loop when ``restart`` arrives. A node that leaves for good
writes ``end`` instead, and ``close`` writes it under this node's own key: no thread is left
blocked in the store (whose host may exit at any time after) when the process exits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import Store

__all__ = ["RESTART", "PeerRestarts"]

logger = logging.getLogger(__name__)

RESTART = b"restart"  # the value that asks the other nodes to restart; anything else ends the wait

# A wait that times out makes torch log two warnings: wait long, and wait again.
_WAIT = timedelta(hours=12)
# Connecting again after a failed connect (torch's client connect to a healthy store stalls
# for seconds now and then) or a broken connection: doubling, up to the last
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 10.0
# close() waits this long for the thread: longer than a connect attempt can block
_JOIN_S = 10.0


class PeerRestarts:
    """Follows one generation at a time (``follow(gen, key)``: this node's wake key in it);
    ``announced(gen)`` says whether a restart out of it was announced. ``connect()`` opens the
    thread's own store connection, or returns None where the rendezvous has none (the agent's
    polling is all there is then)."""

    def __init__(self, connect: Callable[[], Store | None], wake: Callable[[], None]) -> None:
        self._connect = connect
        self._wake = wake
        self._cond = threading.Condition()
        self._following: tuple[int, str] | None = None
        self._waiting: str | None = None  # the key the thread waits on now
        self._done: str | None = None  # the key whose wait ended: wait again only for a new one
        self._announced: set[int] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    def follow(self, generation: int, key: str) -> None:
        """Watch ``key``, this node's wake key in ``generation`` (the one it now runs)."""
        with self._cond:
            self._following = (generation, key)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="stalwart-peer-restarts", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def announced(self, generation: int) -> bool:
        with self._cond:
            return generation in self._announced

    def close(self, release: Callable[[str], None]) -> None:
        """Stop following; ``release(key)`` writes a value other than ``RESTART`` under the key
        the thread waits on, and the thread is joined (bounded)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waiting, thread = self._waiting, self._thread
        if waiting is not None:
            try:
                release(waiting)
            except Exception as exc:  # the store is gone (or a second signal: shutdown goes on)
                logger.debug("could not release the restart watch: %s", exc)
        if thread is not None:
            thread.join(timeout=_JOIN_S)

    def _run(self) -> None:
        delay, warned = _RETRY_FIRST_S, False
        while True:
            try:
                store = self._connect()
            except Exception as exc:  # unreachable for now: polling still finds restarts meanwhile
                if not warned:
                    logger.warning("cannot watch for other nodes' restarts yet (retrying): %s", exc)
                    warned = True
                store = None
            else:
                if store is None:
                    return  # no store of its own to watch: the agent's polling is all there is
                if self._watch(store):
                    return
                delay = _RETRY_FIRST_S  # the connection broke: connect again, soon
            with self._cond:
                if not self._closed:
                    self._cond.wait(delay)
                if self._closed:
                    return
            delay = min(2 * delay, _RETRY_MAX_S)

    def _watch(self, store: Store) -> bool:
        """Wait on the followed key, again for each new one; True once closed, False when the
        connection fails."""
        while True:
            with self._cond:
                while not self._closed and (self._following is None or self._following[1] == self._done):
                    self._cond.wait()
                if self._closed:
                    return True
                assert self._following is not None
                generation, key = self._following
                self._waiting = key
            try:
                store.wait([key], _WAIT)
                value = store.get(key)
            except Exception as exc:
                with self._cond:
                    self._waiting = None
                    closed = self._closed
                if closed:
                    return True
                if "timeout" in str(exc).lower():
                    continue
                logger.debug("lost the store connection watching for restarts: %s", exc)
                return False
            with self._cond:
                self._waiting = None
                self._done = key
                if value == RESTART:
                    self._announced.add(generation)
            if value == RESTART:
                self._wake()
