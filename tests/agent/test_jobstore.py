"""Job-wide generation and restart budget over a real TCPStore (the rendezvous backend's store)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

from torch.distributed import HashStore, PrefixStore, TCPStore

from stalwart.agent.jobstore import JobStore


def _server() -> TCPStore:
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


def _client(server: TCPStore) -> TCPStore:
    return TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))


def _round(store: TCPStore, n: int) -> PrefixStore:
    return PrefixStore(f"torch.rendezvous.job.{n}", store)


def test_agents_of_a_round_agree_on_a_job_wide_generation_that_grows_per_round() -> None:
    server = _server()
    stores = [server, _client(server)]
    for rnd in range(3):
        got: dict[int, int] = {}

        def join(rank: int, rnd: int = rnd, got: dict[int, int] = got) -> None:
            js = JobStore("job", timeout=timedelta(seconds=10))
            got[rank] = js.sync_generation(_round(stores[rank], rnd), rank, 2, fresh_round=True)

        threads = [threading.Thread(target=join, args=(r,)) for r in (1, 0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert got == {0: rnd, 1: rnd}


def test_a_relaunched_agent_sees_the_survivors_generation() -> None:
    server = _server()
    JobStore("job").sync_generation(_round(server, 0), 0, 1, fresh_round=True)
    JobStore("job").sync_generation(_round(server, 1), 0, 1, fresh_round=True)
    fresh = JobStore("job")  # a new process: nothing local survives
    assert fresh.sync_generation(_round(server, 2), 0, 1, fresh_round=True) == 2


def test_static_rounds_count_joins_in_one_namespace() -> None:
    server = _server()
    same = PrefixStore("job", server)
    gens = [JobStore("job").sync_generation(same, r % 2, 2, fresh_round=False) for r in range(6)]
    assert gens == [0, 0, 1, 1, 2, 2]


def test_a_restart_is_counted_once_however_many_agents_claim_it() -> None:
    server = _server()
    a, b = JobStore("job"), JobStore("job")
    a.sync_generation(_round(server, 0), 0, 2, fresh_round=True)
    b._base = _client(server)  # the second agent, already past its rendezvous
    assert not a.restart_claimed(0)
    assert a.claim_restart(0) == (True, 1)
    assert b.restart_claimed(0)
    assert b.claim_restart(0) == (False, 1)
    assert b.claim_restart(1) == (True, 2)
    assert a.restarts_used() == 2


def test_each_generation_gets_its_own_workers_store() -> None:
    server = _server()
    js = JobStore("job")
    js.sync_generation(_round(server, 0), 0, 1, fresh_round=True)
    _, p0 = js.host_worker_store(_round(server, 0), 0, "127.0.0.1")
    w0 = TCPStore("127.0.0.1", p0, is_master=False, timeout=timedelta(seconds=5))
    w0.set("default_pg/0", "stale")
    _, p1 = js.host_worker_store(_round(server, 1), 1, "127.0.0.1")
    assert js.worker_store_address(_round(server, 1), 1) == ("127.0.0.1", p1)
    w1 = TCPStore("127.0.0.1", p1, is_master=False, timeout=timedelta(seconds=5))
    assert not w1.check(["default_pg/0"])


def test_a_store_without_a_job_wide_namespace_counts_on_this_agent() -> None:
    js = JobStore("job")
    round_store = HashStore()  # like the legacy etcd backend's per-round store
    assert js.sync_generation(round_store, 0, 1, fresh_round=True) == 0
    assert js.claim_restart(0) == (True, 1)
    assert js.sync_generation(HashStore(), 0, 1, fresh_round=True) == 1  # a new round's fresh store
    assert js.restarts_used() == 1


def _agents(server: TCPStore, n: int) -> list[JobStore]:
    agents = []
    for _ in range(n):
        js = JobStore("job")
        js._base = _client(server)  # each agent past its rendezvous, on its own connection
        agents.append(js)
    return agents


def test_the_node_whose_fault_came_first_hands_over_though_it_said_so_last() -> None:
    server = _server()
    culprit, peer = _agents(server, 2)
    got: dict[str, bool] = {}

    def elect(js: JobStore, node: str, failed_at: float) -> None:
        got[node] = js.elect_handover(0, node, failed_at, nodes=2, settle=30)

    # the peer's workers failed 20 ms later, but its agent says so first: the race the first
    # claim used to lose
    peer_thread = threading.Thread(target=elect, args=(peer, "peer", 1000.02))
    peer_thread.start()
    deadline = time.monotonic() + 10
    while server.add("stalwart/job/handover/0/count", 0) < 1:
        assert time.monotonic() < deadline, "the peer never said its fault"
        time.sleep(0.01)
    elect(culprit, "culprit", 1000.00)
    peer_thread.join(30)
    assert got == {"culprit": True, "peer": False}


class _LateWrites:
    """A store as seen by a node whose writes arrive late: ``set`` waits for ``release``."""

    def __init__(self, store: TCPStore, release: threading.Event) -> None:
        self._store = store
        self._release = release

    def set(self, key: str, value: str) -> None:
        assert self._release.wait(30)
        self._store.set(key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_fault_counted_but_not_yet_written_is_waited_for() -> None:
    server = _server()
    culprit, peer = _agents(server, 2)
    release = threading.Event()
    culprit._base = _LateWrites(_client(server), release)  # type: ignore[assignment]
    got: dict[str, bool] = {}
    threads = [
        threading.Thread(target=lambda: got.__setitem__("peer", peer.elect_handover(0, "peer", 2.0, 2, 30))),
        threading.Thread(
            target=lambda: got.__setitem__("culprit", culprit.elect_handover(0, "culprit", 1.0, 2, 30))
        ),
    ]
    threads[0].start()
    deadline = time.monotonic() + 10
    while server.add("stalwart/job/handover/0/count", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threads[1].start()  # counts itself, then blocks in its write
    while server.add("stalwart/job/handover/0/count", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        # both nodes are counted, one entry is written: an election that settled on that would
        # finish now, and the peer, alone in it, would hand over
        threads[0].join(1.0)
        assert threads[0].is_alive(), f"settled without the counted culprit: {got}"
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert got == {"culprit": True, "peer": False}


def test_a_node_alone_hands_over_at_once_and_a_late_node_cannot_make_a_second() -> None:
    server = _server()
    (solo,) = _agents(server, 1)
    assert solo.elect_handover(3, "solo", 5.0, nodes=1, settle=30)
    assert solo.elect_handover(3, "solo", 5.0, nodes=1, settle=30)  # a second fault: the same say
    assert server.add("stalwart/job/handover/3/count", 0) == 1
    first, late = _agents(server, 2)
    assert first.elect_handover(4, "a", 2.0, nodes=2, settle=0.05)  # the other node never said
    # it says later, with an earlier fault: its choice is itself, but the claim is taken
    assert not late.elect_handover(4, "b", 1.0, nodes=2, settle=0.05)


def test_a_tie_hands_over_exactly_one_node() -> None:
    server = _server()
    agents = _agents(server, 3)
    got: dict[str, bool] = {}
    threads = [
        threading.Thread(
            target=lambda js=js, name=name: got.__setitem__(name, js.elect_handover(0, name, 7.0, 3, 30))
        )
        for js, name in zip(agents, ("c", "a", "b"), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {"a": True, "b": False, "c": False}
