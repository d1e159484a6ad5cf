"""Job-wide state in the rendezvous store: generation, restart budget, and the workers' store.

torchrun counts restarts per agent and lets workers reuse the rendezvous store, so restarted
workers can read the previous generation's gloo keys (see the feasibility notes, section 2.3).
Here instead:

* one restart count for the job lives in the rendezvous backend's store (not round-prefixed);
* every rendezvous round gets a job-wide generation number, agreed by all agents of the round,
  so a relaunched node agrees with the survivors;
* the agent of group rank 0 hosts a fresh ``TCPStore`` for the workers of each generation and
  publishes its address under a generation-specific key: no key can be stale.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

from torch.distributed import HashStore, PrefixStore, Store, TCPStore

from stalwart.agent.peers import RESTART

__all__ = ["JobStore"]

logger = logging.getLogger(__name__)

_HANDOVER_POLL_S = 0.02


def _base_store(store: Store) -> Store:
    """The store under a rendezvous round's ``PrefixStore`` (job-wide), or the store itself."""
    while isinstance(store, PrefixStore):
        store = store.underlying_store
    return store


class JobStore:
    """Job-wide keys for run ``run_id``, read and written through the rendezvous stores."""

    def __init__(self, run_id: str, timeout: timedelta = timedelta(seconds=300)) -> None:
        self._prefix = f"stalwart/{run_id}"
        self._timeout = timeout
        self._base: Store | None = None
        self._worker_store: TCPStore | None = None
        self._local: Store | None = None
        self._elections: dict[int, bool] = {}  # generation -> whether this node hands over
        self._static = False  # the static backend's rounds

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    @property
    def base(self) -> Store:
        if self._base is None:
            raise RuntimeError("JobStore used before the first rendezvous")
        return self._base

    def attach(self, store: Store | None) -> None:
        """Use ``store`` (the rendezvous backend's) before any round completed: a node that
        arrives after the job ended reads why through it."""
        if self._base is None and store is not None:
            self._base = _base_store(store)

    def sync_generation(
        self, round_store: Store, group_rank: int, group_world_size: int, fresh_round: bool
    ) -> int:
        """Agree on the job-wide generation of the round that just completed; returns it.

        With a round-prefixed store (c10d, etcd) group rank 0 draws the next number and publishes it
        in the round's own namespace. The static backend reuses one namespace and keeps the world
        size fixed, so there every agent counts joins instead: generation = joins // world size.
        """
        base = _base_store(round_store)
        if base is round_store:
            # Not round-prefixed (the legacy etcd backend): no job-wide namespace to write to, so
            # count on this agent only, as torchrun does.
            if self._local is None:
                logger.warning("this rendezvous backend has no job-wide store: counting restarts per agent")
                self._local = HashStore()
            base = self._local
        self._base = base
        self._static = not fresh_round
        if not fresh_round:
            joins = self._base.add(self._key("joins"), 1)
            return (joins - 1) // group_world_size
        key = "stalwart/generation"
        if group_rank == 0:
            generation = self._base.add(self._key("generation"), 1) - 1
            round_store.set(key, str(generation))
            return generation
        round_store.wait([key], self._timeout)
        return int(round_store.get(key))

    def restarts_used(self) -> int:
        """The job-wide number of budgeted restarts so far."""
        return int(self.base.add(self._key("restarts"), 0))

    def restart_claimed(self, generation: int) -> bool:
        """Whether some agent already counted the restart out of ``generation``."""
        return self.base.add(self._key(f"restart_claim/{generation}"), 0) > 0

    def claim_restart(self, generation: int) -> tuple[bool, int]:
        """Count the restart out of ``generation`` once for the whole job.

        Several agents may see the same incident (a crash on one node fails the others' workers);
        only the first claim increments. Returns (this agent claimed it, restarts used now).
        """
        first = self.base.add(self._key(f"restart_claim/{generation}"), 1) == 1
        used = self.base.add(self._key("restarts"), 1 if first else 0)
        return first, int(used)

    def claim_handover(self, generation: int) -> bool:
        """Whether this agent is the first to hand its node over out of ``generation`` (the
        restart budget is spent); the others wait in the rendezvous for its replacement."""
        return bool(self.base.add(self._key(f"handover_claim/{generation}"), 1) == 1)

    def elect_handover(self, generation: int, node: str, failed_at: float, nodes: int, settle: float) -> bool:
        """Whether ``node`` hands itself over out of ``generation``: the node whose fault came
        first, among the nodes that saw one within ``settle`` seconds of this one's (fewer once
        all ``nodes`` said theirs).

        One crash fails the workers of every node, a few milliseconds apart; replacing a node
        whose workers only lost their peers leaves the faulty one in the job. Wall clocks of the
        nodes are compared (NTP keeps them within milliseconds). A node that says its fault
        after the others settled cannot change the choice: ``claim_handover`` still lets one
        node only hand over.
        """
        if generation in self._elections:  # several faults of one incident: one say each node
            return self._elections[generation]
        if self._local is not None and self._base is self._local:
            # no job-wide store: every node counts (and ends) alone
            self._elections[generation] = self.claim_handover(generation)
            return self._elections[generation]
        count = self._key(f"handover/{generation}/count")

        def entry(i: int) -> str:
            return self._key(f"handover/{generation}/{i}")

        index = self.base.add(count, 1)
        self.base.set(entry(index), json.dumps([failed_at, node]))
        # settled once every node said its fault and every said fault is written (a node counts
        # itself before it writes), or at the deadline
        deadline = time.monotonic() + settle
        while True:
            said = self.base.add(count, 0)
            if (said >= nodes and self.base.check([entry(i) for i in range(1, said + 1)])) or (
                time.monotonic() >= deadline
            ):
                break
            time.sleep(_HANDOVER_POLL_S)
        seen: list[tuple[float, str]] = []
        for i in range(1, said + 1):
            if self.base.check([entry(i)]):  # still unwritten at the deadline: its node is late
                at, name = json.loads(self.base.get(entry(i)))
                seen.append((float(at), str(name)))
        chosen = min(seen)[1] == node and self.claim_handover(generation)
        self._elections[generation] = chosen
        return chosen

    def wake_key(self, generation: int, group_rank: int) -> str:
        """Node ``group_rank``'s key, in the job-wide store, for news of ``generation`` from the
        other nodes (``stalwart.agent.peers``)."""
        return self._key(f"wake/{generation}/{group_rank}")

    def announce(self, generation: int, nodes: int, value: bytes) -> None:
        """Write ``value`` under the wake key of each of the ``nodes`` nodes of ``generation``;
        a value other than ``RESTART`` only where nothing was written yet (a node that leaves
        must not hide another node's restart from a third)."""
        atomic = _compare_set_wakes(self.base)
        for rank in range(nodes):
            key = self.wake_key(generation, rank)
            if value == RESTART:
                self.base.set(key, value)
            elif atomic:
                self.base.compare_set(key, "", value)
            elif not self.base.check([key]):  # a classic TCPStore's compare_set wakes no waiter
                self.base.set(key, value)

    def restart_announced(self, generation: int, group_rank: int) -> bool:
        """Whether some node announced a restart out of ``generation`` under node
        ``group_rank``'s wake key, read now (the watching thread may not have woken yet)."""
        if self._static:  # its generation numbers can repeat: an old round's key would answer
            return False
        key = self.wake_key(generation, group_rank)
        return bool(self.base.check([key])) and self.base.get(key) == RESTART

    def connect_apart(self, timeout: timedelta = timedelta(seconds=3)) -> Store | None:
        """A connection of its own to the job-wide store (a ``TCPStore``'s), for a thread that
        blocks in ``wait``; None for other stores."""
        base = self._base
        if not isinstance(base, TCPStore) or base is self._local or self._static:
            return None  # (static rounds can repeat a generation number: its keys would be stale)
        return TCPStore(
            base.host,
            base.port,
            is_master=False,
            timeout=timeout,
            use_libuv=getattr(base, "libuvBackend", False),
        )

    def host_worker_store(self, round_store: Store, generation: int, host: str) -> tuple[str, int]:
        """On group rank 0: start a fresh TCPStore for the workers of ``generation`` and publish it."""
        self.close_worker_store()
        store = TCPStore(
            host_name=host,
            port=0,
            is_master=True,
            wait_for_workers=False,
            timeout=self._timeout,
            use_libuv=True,
        )
        self._worker_store = store
        round_store.set(f"stalwart/worker_store/{generation}", f"{host}:{store.port}")
        logger.debug("hosting the workers' store of generation %d on %s:%d", generation, host, store.port)
        return host, store.port

    def worker_store_address(self, round_store: Store, generation: int) -> tuple[str, int]:
        """On other ranks: the address group rank 0 published for ``generation``."""
        key = f"stalwart/worker_store/{generation}"
        round_store.wait([key], self._timeout)
        host, _, port = round_store.get(key).decode().rpartition(":")
        return host, int(port)

    def record_end(self, code: int, reason: str, node: str) -> None:
        """Before this node closes the rendezvous: why the job ends, for the other nodes (the
        first record wins)."""
        if self.base.add(self._key("end_claim"), 1) == 1:
            self.base.set(self._key("end"), json.dumps({"code": code, "reason": reason, "node": node}))

    def ended(self) -> tuple[int, str, str] | None:
        """(exit code, reason, node) of the node that ended the job, if it recorded one."""
        if self.base.add(self._key("end_claim"), 0) == 0:
            return None
        raw = json.loads(self.base.get(self._key("end")))
        return int(raw["code"]), str(raw["reason"]), str(raw["node"])

    def close_worker_store(self) -> None:
        # Dropping the last reference stops the TCPStore server.
        self._worker_store = None


def _compare_set_wakes(store: Store) -> bool:
    """Whether ``compare_set`` on ``store`` wakes the clients waiting on its key: torch's classic
    (non-libuv) TCPStore does not; its libuv one (the default) and the in-process stores do."""
    while isinstance(store, PrefixStore):
        store = store.underlying_store
    return bool(getattr(store, "libuvBackend", True)) if isinstance(store, TCPStore) else True
