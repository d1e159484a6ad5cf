"""``PeerRestarts``: a node hears at once that another node restarts out of its generation.

A node that restarts its workers (or hands itself over) announces it under a job-wide key
(``JobStore.announce_restart``). Without this, the other nodes learn of it only when their own
workers fail on the broken collective (NCCL's may hang until its timeout, minutes) or at their
next ``--monitor-interval`` poll of the rendezvous (and only once the restarting node has
stopped its workers and joined the next round). Here a thread blocks in the store's ``wait`` on
the key of the generation this node runs, on a connection of its own (a waiting client blocks
its connection), and wakes the agent's loop when it appears.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import Store

__all__ = ["PeerRestarts"]

logger = logging.getLogger(__name__)

# A wait that times out makes torch log two warnings: wait long, and wait again.
_WAIT = timedelta(hours=12)


class PeerRestarts:
    """Follows the announcements of one generation at a time (``follow``); ``announced(gen)``
    says whether one came. ``connect()`` opens the thread's own store connection, or returns
    None where the rendezvous has no such store (the agent's polling is all there is then)."""

    def __init__(
        self, connect: Callable[[], Store | None], key: Callable[[int], str], wake: Callable[[], None]
    ) -> None:
        self._connect = connect
        self._key = key
        self._wake = wake
        self._cond = threading.Condition()
        self._following: int | None = None
        self._announced: set[int] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    def follow(self, generation: int) -> None:
        """Watch for a restart out of ``generation`` (the one this node now runs)."""
        with self._cond:
            self._following = generation
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="stalwart-peer-restarts", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def announced(self, generation: int) -> bool:
        with self._cond:
            return generation in self._announced

    def close(self) -> None:
        """Stop following. A wait under way ends with its key or its connection (a daemon
        thread: nothing to join)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            store = self._connect()
        except Exception as exc:  # the store is unreachable: polling still finds restarts
            logger.debug("cannot watch for other nodes' restarts: %s", exc)
            return
        if store is None:
            return
        while True:
            with self._cond:
                while not self._closed and (self._following is None or self._following in self._announced):
                    self._cond.wait()
                if self._closed:
                    return
                generation = self._following
            assert generation is not None
            try:
                store.wait([self._key(generation)], _WAIT)
            except Exception as exc:
                if "timeout" in str(exc).lower():
                    continue
                logger.debug("stopped watching for other nodes' restarts: %s", exc)  # the store went
                return
            with self._cond:
                self._announced.add(generation)
            self._wake()
