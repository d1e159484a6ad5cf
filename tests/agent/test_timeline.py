"""The recovery timeline: events in, incidents with per-phase seconds out; ``stalwart events``."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from stalwart.agent.timeline import Timeline, events_command, format_incidents, load_events, summarize


def _write(log_dir: Path, node: str, events: list[tuple[float, str, int, dict]]) -> None:
    clock = iter(t for t, *_ in events)
    tl = Timeline(str(log_dir), node, clock=lambda: next(clock))
    for _, event, gen, fields in events:
        tl.emit(event, gen, **fields)
    tl.close()


def _two_node_incident(log_dir: Path) -> None:
    fault = {"kind": "worker_exit", "rank": 3, "message": "rank 3 signal SIGKILL", "observed_at": 100.0}
    _write(
        log_dir,
        "b",
        [
            (100.1, "fault", 0, {"fault": fault}),
            (100.1, "restart", 0, {"reason": "worker_exit"}),
            (100.3, "workers_stopped", 0, {}),
            (101.0, "rendezvous", 1, {}),
            (101.1, "workers_started", 1, {}),
            (102.5, "checkpoint_loaded", 1, {"step": 4, "tier": "memory tier", "seconds": 0.25, "rank": 2}),
            (103.0, "first_step", 1, {"step": 5}),
        ],
    )
    _write(
        log_dir,
        "a",
        [
            (100.5, "restart", 0, {"reason": "peer"}),
            (100.6, "workers_stopped", 0, {}),
            (101.0, "rendezvous", 1, {}),
            (101.2, "workers_started", 1, {}),
            (103.5, "first_step", 1, {"step": 5}),
        ],
    )


def test_an_incident_spans_from_the_fault_to_the_last_nodes_first_step(tmp_path: Path) -> None:
    _two_node_incident(tmp_path)
    (inc,) = summarize(load_events(str(tmp_path)))
    assert inc.generation == 1
    assert inc.start == 100.0
    assert inc.seconds is not None and abs(inc.seconds - 3.5) < 1e-9
    assert "rank 3" in inc.cause and "on b" in inc.cause
    phases = inc.phases("b")
    assert [round(v or 0, 3) for v in phases.values()] == [0.1, 0.2, 0.7, 0.1, 1.9]
    assert set(inc.nodes) == {"a", "b"}
    assert inc.reloads == {"b": {"step": 4, "tier": "memory tier", "seconds": 0.25}}
    assert "b: reloaded checkpoint step 4 from the memory tier in 0.25 s" in format_incidents([inc])


def test_advisory_faults_are_not_the_cause_of_an_incident(tmp_path: Path) -> None:
    warn = {"kind": "log_rule", "rank": 0, "message": "traceback seen", "observed_at": 99.0}
    _write(tmp_path, "c", [(99.0, "fault", 0, {"fault": warn, "verdict": "continue"})])
    _two_node_incident(tmp_path)
    (inc,) = summarize(load_events(str(tmp_path)))
    assert inc.cause.startswith("worker_exit rank 3") and inc.start == 100.0


def test_no_restart_means_no_incident(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "a",
        [(1.0, "rendezvous", 0, {}), (1.1, "workers_started", 0, {}), (2.0, "first_step", 0, {})],
    )
    assert summarize(load_events(str(tmp_path))) == []
    assert "no incidents" in format_incidents([])


def test_an_unrecovered_incident_says_so(tmp_path: Path) -> None:
    _write(tmp_path, "a", [(1.0, "restart", 0, {}), (1.2, "rendezvous", 1, {})])
    (inc,) = summarize(load_events(str(tmp_path)))
    assert inc.seconds is None
    assert "not recovered" in format_incidents([inc])


def test_malformed_lines_are_skipped(tmp_path: Path) -> None:
    _two_node_incident(tmp_path)
    with open(tmp_path / "events-a.jsonl", "a") as f:
        f.write("{not json\n")
    assert len(summarize(load_events(str(tmp_path)))) == 1


def test_events_command_prints_each_phase_per_node(tmp_path: Path) -> None:
    _two_node_incident(tmp_path)
    out = CliRunner().invoke(events_command, [str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "generation 1" in out.output and "3.50 s" in out.output
    for word in ("detect", "stop", "rendezvous", "spawn", "first_step"):
        assert word in out.output
    js = CliRunner().invoke(events_command, [str(tmp_path), "--json"])
    assert abs(json.loads(js.output)[0]["nodes"]["b"]["first_step"] - 1.9) < 1e-9


def test_events_command_on_a_dir_without_events_is_a_clear_error(tmp_path: Path) -> None:
    out = CliRunner().invoke(events_command, [str(tmp_path)])
    assert out.exit_code != 0
    assert "no events-*.jsonl" in out.output and "--log-dir" in out.output
