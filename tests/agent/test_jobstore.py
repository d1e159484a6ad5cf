"""Job-wide generation and restart budget over a real TCPStore (the rendezvous backend's store)."""

from __future__ import annotations

import threading
from datetime import timedelta

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
