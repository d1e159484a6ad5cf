"""Reliable restarts: many crash-restart cycles in a row, single node and two nodes on loopback.

Each cycle kills rank 1 with SIGKILL at a later step; the fault markers make each crash fire once.
Every cycle must recover: generation k trains past the step where generation k-1 crashed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

StalwartRunner = Any  # the ``stalwart`` fixture's type (tests/conftest.py)

CYCLES = 20
EVERY = 2  # steps between crashes


def _faults(rank: int) -> str:
    return ",".join(f"crash:rank={rank}:step={EVERY * k}" for k in range(1, CYCLES + 1))


def _faults_seen(stalwart: StalwartRunner) -> str:
    """The agents' fault decisions, for a failure message (the output's tail shows recoveries
    only: an unexpected extra fault that spent the budget would not be in it)."""
    faults = [
        {k: e.get(k) for k in ("node", "generation", "verdict", "decision")}
        | {"fault": e.get("fault", {}).get("message")}
        for e in stalwart.events()
        if e.get("event") == "fault"
    ]
    return "\nfaults seen:\n" + "\n".join(json.dumps(f) for f in faults[-(CYCLES + 3) :])


def _assert_every_cycle_recovered(stalwart: StalwartRunner, rank: int, steps: int) -> None:
    progress = stalwart.progress_of(rank)
    gens = sorted({g for g, _ in progress})
    assert gens == list(range(CYCLES + 1)), f"generations seen: {gens}"
    for k in range(1, CYCLES + 1):
        crashed_at = EVERY * k
        assert max(s for g, s in progress if g == k) > crashed_at, f"generation {k} made no progress"
    assert progress[-1] == (CYCLES, steps)
    assert len(list((stalwart.log_dir / "faults").glob("fault-*"))) == CYCLES


@pytest.mark.slow
def test_twenty_crash_restart_cycles_on_one_node_all_recover(stalwart: StalwartRunner) -> None:
    steps = EVERY * CYCLES + 1
    p = stalwart.start(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(CYCLES),
        "--fault",
        _faults(1),
        "--status-port",
        "0",
        *stalwart.tiny_args(steps),
    )
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-3000:] + _faults_seen(stalwart)
    _assert_every_cycle_recovered(stalwart, 1, steps)
    budget = [e["used"] for e in stalwart.events() if e["event"] == "budget"]
    assert budget == list(range(1, CYCLES + 1))


def test_restarts_recover_with_the_static_backend_too(stalwart: StalwartRunner, free_port: Any) -> None:
    """torchrun's default backend, where reused store keys broke a third of its restarts."""
    cycles, steps = 5, EVERY * 5 + 1
    faults = ",".join(f"crash:rank=1:step={EVERY * k}" for k in range(1, cycles + 1))
    p = stalwart.start(
        "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "--max-restarts", str(cycles), "--fault", faults,
        *stalwart.tiny_args(steps),
    )  # fmt: skip
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:] + _faults_seen(stalwart)
    progress = stalwart.progress_of(1)
    assert sorted({g for g, _ in progress}) == list(range(cycles + 1))
    assert progress[-1] == (cycles, steps)
    assert [e["generation"] for e in stalwart.events() if e["event"] == "rendezvous"] == list(
        range(cycles + 1)
    )


def _two_agents(stalwart: StalwartRunner, port: int, *extra: str, steps: int) -> list[subprocess.Popen[str]]:
    common = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "twonode",
        "--status-port",
        "0",
        *extra,
    ]
    a = stalwart.start(*common, "--node-name", "a", *stalwart.tiny_args(steps))
    b = stalwart.start(*common, "--node-name", "b", *stalwart.tiny_args(steps))
    return [a, b]


def test_a_crash_on_the_second_node_restarts_both_nodes(stalwart: StalwartRunner, free_port: Any) -> None:
    agents = _two_agents(
        stalwart, free_port(), "--max-restarts", "1", "--fault", "crash:rank=1:step=3", steps=6
    )
    outs = [p.communicate(timeout=200)[0] for p in agents]
    assert [p.returncode for p in agents] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    for rank in (0, 1):
        assert [s for g, s in stalwart.progress_of(rank) if g == 1] == [4, 5, 6]
    # the job-wide budget counted the incident once although both nodes restarted
    used = {e["node"]: e["used"] for e in stalwart.events() if e["event"] == "budget"}
    assert used == {"a": 1, "b": 1}
    for out in outs:  # a hosts the store: nothing on either node is left blocked in it at exit
        assert "terminate called" not in out and "recvValueWithTimeout" not in out


@pytest.mark.slow
def test_twenty_crash_restart_cycles_on_two_nodes_all_recover(
    stalwart: StalwartRunner, free_port: Any
) -> None:
    steps = EVERY * CYCLES + 1
    agents = _two_agents(
        stalwart, free_port(), "--max-restarts", str(CYCLES), "--fault", _faults(1), steps=steps
    )
    outs = [p.communicate(timeout=500)[0] for p in agents]
    assert [p.returncode for p in agents] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    _assert_every_cycle_recovered(stalwart, 1, steps)
    _assert_every_cycle_recovered(stalwart, 0, steps)


def test_a_relaunched_node_rejoins_and_agrees_on_the_generation(
    stalwart: StalwartRunner, free_port: Any, wait_for: Any
) -> None:
    """Like a pod restart: node b's agent is SIGKILLed (its worker dies with it) and started again."""
    port = free_port()

    def agent(node: str, host: int) -> subprocess.Popen[str]:
        return stalwart.start(
            "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "relaunch", "--max-restarts", "2",
            "--rdzv-conf", f"is_host={host},keep_alive_interval=1,keep_alive_max_attempt=2",
            "--node-name", node, "--status-port", "0",
            *stalwart.tiny_args(30, "--step-time", "0.1"),
        )  # fmt: skip

    a = agent("a", 1)
    b = agent("b", 0)
    wait_for(lambda: len(stalwart.progress_of(1)) >= 3 or a.poll() is not None, 120, what="progress")
    assert a.poll() is None and b.poll() is None
    b.kill()
    b.wait(timeout=10)
    b2 = agent("b", 0)
    outs = [p.communicate(timeout=200)[0] for p in (a, b2)]
    assert [a.returncode, b2.returncode] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    last0, last1 = stalwart.progress_of(0)[-1], stalwart.progress_of(1)[-1]
    assert last0 == last1 and last0[1] == 30 and last0[0] >= 1
    gens_b2 = [e["generation"] for e in stalwart.events() if e["node"] == "b" and e["event"] == "rendezvous"]
    assert gens_b2[-1] == last1[0]  # the new agent took the job-wide generation, not 0


def _agent_on(stalwart: StalwartRunner, port: int, run_id: str, node: str, host: int, *extra: str) -> Any:
    return stalwart.start(
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "--max-restarts", "2",
        "--rdzv-conf", f"is_host={host},keep_alive_interval=1,keep_alive_max_attempt=2",
        "--node-name", node, "--status-port", "0", *extra,
    )  # fmt: skip


def _replace_and_rejoin(
    stalwart: StalwartRunner,
    port: int,
    run_id: str,
    sick: str,
    other: str,
    hosts: dict,
    *extra: str,
    worker: tuple[str, ...] = (),
) -> str:
    """Node ``sick`` hands itself over at step 3 (exit 75); the other waits in the rendezvous,
    the orchestrator's replacement joins, and both finish all 12 steps. The other node's output."""
    rule = json.dumps(
        {"name": "sick-gpu", "logPattern": "step 3 loss", "faultOnMatch": True, "action": "replace_node"}
    )
    work = stalwart.tiny_args(12, "--step-time", "0.05", *worker)
    healthy = _agent_on(stalwart, port, run_id, other, hosts[other], *extra, *work)
    node = _agent_on(stalwart, port, run_id, sick, hosts[sick], *extra, "--log-rule", rule, *work)
    out = node.communicate(timeout=200)[0]
    assert node.returncode == 75, out[-3000:]
    replacement = _agent_on(stalwart, port, run_id, sick, hosts[sick], *extra, *work)
    outs = [p.communicate(timeout=200)[0] for p in (healthy, replacement)]
    assert [healthy.returncode, replacement.returncode] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    assert stalwart.progress_of(0)[-1][1] == stalwart.progress_of(1)[-1][1] == 12
    return outs[0]


def test_a_node_that_asks_to_be_replaced_leaves_the_rendezvous_open_for_its_replacement(
    stalwart: StalwartRunner, free_port: Any
) -> None:
    """Exit 75 hands the node to the orchestrator; the other node must wait for the replacement
    (closing the rendezvous would end it with exit 1, which fails a Kubernetes job at once)."""
    _replace_and_rejoin(stalwart, free_port(), "replace", "b", "a", {"a": 1, "b": 0})  # a hosts the store


def test_a_node_handed_over_by_its_monitor_is_followed_without_spending_or_a_second_handover(
    stalwart: StalwartRunner, free_port: Any
) -> None:
    """With the budget spent, and workers that exit as soon as a collective fails: the healthy
    node's worker fails when the sick node stops its own. It must follow the sick node's
    hand-over (announced before that node stops its workers), not hand itself over too (a
    second pod replaced for one incident), nor spend a restart where budget remains."""
    out = _replace_and_rejoin(
        stalwart, free_port(), "monitor", "b", "a", {"a": 1, "b": 0}, "--max-restarts", "0",
        worker=("--exit-on-error",),
    )  # fmt: skip
    assert "restart budget spent" not in out, out[-3000:]
    budget = [e["used"] for e in stalwart.events() if e["node"] == "a" and e["event"] == "budget"]
    assert budget and set(budget) == {0}


def test_with_the_store_apart_the_node_that_would_have_hosted_it_can_be_replaced(
    stalwart: StalwartRunner, free_port: Any, wait_for: Any, tmp_path: Path
) -> None:
    """The local backend's store process (``stalwart.job.store``): node a, the store's host in the
    test above, now hands itself over, and its replacement rejoins."""
    import socket
    import sys

    port = free_port()
    job = tmp_path / "job"
    job.mkdir()
    stalwart.procs.start([sys.executable, "-m", "stalwart.job.store", str(port), str(job), "2"])

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 60, what="the store")
    _replace_and_rejoin(stalwart, port, "apart", "a", "b", {"a": 0, "b": 0})


def test_a_user_error_on_one_node_ends_the_job_with_the_same_code_on_every_node(
    stalwart: StalwartRunner, free_port: Any, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import stalwart_no_such_module_xyz\n")
    port = free_port()
    a = _agent_on(stalwart, port, "usererr", "a", 1, *stalwart.tiny_args(50, "--step-time", "0.05"))
    b = _agent_on(stalwart, port, "usererr", "b", 0, "--no-standby", str(broken))
    outs = [p.communicate(timeout=200)[0] for p in (a, b)]
    assert [a.returncode, b.returncode] == [3, 3], "\n=====\n".join(o[-3000:] for o in outs)
    assert "node b ended the job" in outs[0] and "user error" in outs[0]


def _store_apart(stalwart: StalwartRunner, port: int, wait_for: Any) -> None:
    """A store of its own, as a Kubernetes job's ``<job>-rdzv`` pod serves it (until SIGTERM)."""
    import socket
    import sys

    stalwart.procs.start([sys.executable, "-m", "stalwart.job.store", str(port)])

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 60, what="the store")


def test_a_node_that_waits_past_the_join_timeout_hands_itself_over_and_leaves_the_rendezvous_open(
    stalwart: StalwartRunner, free_port: Any, wait_for: Any
) -> None:
    """Its peer is a replacement still coming up: exiting 1 (and closing the rendezvous) failed the
    whole Kubernetes job, and the replacement with it."""
    port = free_port()
    _store_apart(stalwart, port, wait_for)
    work = stalwart.tiny_args(8, "--step-time", "0.05")
    alone = _agent_on(stalwart, port, "late", "a", 0, "--rdzv-conf", "is_host=0,join_timeout=3", *work)
    out = alone.communicate(timeout=120)[0]
    assert alone.returncode == 75, out[-3000:]
    assert "RendezvousTimeoutError" in out and "handing this node over" in out
    nodes = [_agent_on(stalwart, port, "late", n, 0, *work) for n in ("a", "b")]
    outs = [p.communicate(timeout=200)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)


def test_a_node_that_arrives_after_the_job_ended_exits_with_the_recorded_code(
    stalwart: StalwartRunner, free_port: Any, wait_for: Any
) -> None:
    """It never completes a rendezvous, yet reads why the job ended (it exited 1 before)."""
    port = free_port()
    _store_apart(stalwart, port, wait_for)
    single = ["--nnodes", "1", "--rdzv-conf", "is_host=0"]
    work = stalwart.tiny_args(4)
    first = _agent_on(stalwart, port, "ended", "a", 0, *single, "--pre-train-script", "false", *work)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 4, out[-3000:]
    late = _agent_on(stalwart, port, "ended", "a2", 0, *single, *work)
    out = late.communicate(timeout=120)[0]
    assert late.returncode == 4, out[-3000:]
    assert "node a ended the job" in out and "pre-train script" in out


def test_with_the_budget_spent_one_node_per_incident_hands_itself_over(
    stalwart: StalwartRunner, free_port: Any, wait_for: Any
) -> None:
    """A crash fails every node's workers; each node exiting 76 cost the job one pod replacement
    (its backoffLimit) per node. One does, the one whose worker crashed; the other waits for its
    replacement."""
    port = free_port()
    _store_apart(stalwart, port, wait_for)
    work = [
        "--max-restarts",
        "0",
        "--fault",
        "crash:rank=1:step=3",
        *stalwart.tiny_args(8, "--step-time", "0.05"),
    ]
    nodes = {
        n: _agent_on(stalwart, port, "spent", n, 0, "--rdzv-conf", "is_host=0", *work) for n in ("a", "b")
    }
    wait_for(lambda: any(p.poll() is not None for p in nodes.values()), 120, what="a node to hand over")
    gone = next(n for n, p in nodes.items() if p.poll() is not None)
    stayed = next(n for n in nodes if n != gone)
    # the node whose worker crashed, not the one whose worker only lost its peer
    assert (stalwart.log_dir / gone / "gen-0" / "rank-1.log").exists(), f"{gone} was not rank 1's node"
    out = nodes[gone].communicate(timeout=30)[0]
    assert nodes[gone].returncode == 76, out[-3000:]
    assert nodes[stayed].poll() is None  # waiting in the rendezvous, not handed over too
    replacement = _agent_on(stalwart, port, "spent", gone, 0, "--rdzv-conf", "is_host=0", *work)
    outs = [p.communicate(timeout=200)[0] for p in (nodes[stayed], replacement)]
    assert [nodes[stayed].returncode, replacement.returncode] == [0, 0], "\n=====\n".join(
        o[-3000:] for o in outs
    )
    assert "another node handed itself over; waiting for its replacement" in outs[0]
    assert stalwart.progress_of(0)[-1][1] == stalwart.progress_of(1)[-1][1] == 8


def test_a_node_hears_another_nodes_restart_at_once(
    stalwart: StalwartRunner, free_port: Any, wait_for: Any
) -> None:
    """Node b restarts its workers (a log rule); node a's workers talk to no one, so nothing fails
    there, and a polls the rendezvous only every 600 s: b's announcement alone brings a to the
    next round, and both finish."""
    port = free_port()
    _store_apart(stalwart, port, wait_for)
    rule = json.dumps(
        {"name": "restart-b", "logPattern": "gen 0 step 3$", "faultOnMatch": True, "action": "restart"}
    )
    # generation 0 lasts 30 s unless a restart cuts it short
    work = [
        str(Path(__file__).parents[1] / "workers" / "no_collectives.py"),
        "--steps",
        "8",
        "--gen0-steps",
        "600",
    ]
    a = _agent_on(
        stalwart, port, "peers", "a", 0, "--rdzv-conf", "is_host=0", "--monitor-interval", "600", *work
    )
    b = _agent_on(stalwart, port, "peers", "b", 0, "--rdzv-conf", "is_host=0", "--log-rule", rule, *work)
    outs = [p.communicate(timeout=120)[0] for p in (a, b)]
    assert [a.returncode, b.returncode] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    restarts = {e["node"]: e["reason"] for e in stalwart.events() if e["event"] == "restart"}
    assert restarts.keys() == {"a", "b"}
    assert restarts["a"] == "another node announced a restart"
    assert "gen 1 step 8" in outs[0]
    for out in outs:  # nothing left blocked in the store when its host went
        assert "terminate called" not in out and "recvValueWithTimeout" not in out


def test_a_node_that_cannot_reach_its_store_at_start_hands_itself_over(
    stalwart: StalwartRunner, free_port: Any
) -> None:
    """The store's pod may still be pulling its image: 1 would fail the whole Kubernetes job."""
    port = free_port()  # nothing listens there
    p = _agent_on(
        stalwart, port, "nostore", "a", 0, "--rdzv-conf", "is_host=0,read_timeout=2", *stalwart.tiny_args(2)
    )
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 75, out[-3000:]
    assert "cannot reach the c10d rendezvous" in out
