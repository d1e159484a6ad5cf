"""The recovery timeline: JSONL events per agent, and a per-incident summary across nodes.

Each agent appends to ``<log-dir>/events-<node>.jsonl`` one JSON object per line with at least
``time`` (wall clock), ``node``, ``event`` and ``generation``. Events:

================== ==================================================================
fault              a fault was seen (``fault``: the Fault's JSON; ``verdict``, ``decision``)
restart            this node restarts its workers (``reason``; ``from_generation``)
workers_stopped    the workers of ``from_generation`` are gone
rendezvous         rendezvous complete (``generation``, ``group_rank``, ``world_size``)
workers_started    the workers of ``generation`` were spawned
first_step         the first report of ``generation`` arrived (``step``, ``rank``)
budget             the job-wide budget after a restart (``used``, ``max``)
exit               the agent exits (``code``, ``reason``)
================== ==================================================================

Workers add their own events through ``stalwart.worker.event`` (with the sending ``rank``); the
checkpointer's are:

======================== ============================================================
checkpoint_saved         rank 0 committed ``step`` at ``uri`` (``seconds`` since save())
checkpoint_failed        a save of ``step`` did not persist (``error``); training went on
checkpoint_mirror_failed a copy of ``step`` to the mirror ``uri`` failed (``error``)
checkpoint_corrupt       a load skipped ``step`` on ``tier`` (``error`` names the file)
checkpoint_loaded        local rank 0 loaded ``step`` from ``tier`` in ``seconds``
======================== ============================================================

An incident is the recovery into generation G (G >= 1): it spans from the earliest fault any node
saw in generation G-1 to the first step of generation G.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import click

__all__ = [
    "Incident",
    "Timeline",
    "checkpoint_summary",
    "events_command",
    "format_incidents",
    "load_events",
    "summarize",
]

_PHASES = ("detect", "stop", "rendezvous", "spawn", "first_step")


class Timeline:
    """Appends events for one node to ``<log_dir>/events-<node>.jsonl`` (thread-safe)."""

    def __init__(
        self, log_dir: str, node: str, clock: Any = time.time, echo: Callable[[str], None] | None = None
    ) -> None:
        self.node = node
        self._echo = echo  # also hands each event's JSON line here (the agent prints it)
        self.path = os.path.join(log_dir, f"events-{node}.jsonl")
        self._clock = clock
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []  # this node's events, for live phase metrics
        os.makedirs(log_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def emit(self, event: str, generation: int, **fields: Any) -> dict[str, Any]:
        record = {"time": self._clock(), "node": self.node, "event": event, "generation": generation}
        record.update(fields)
        line = json.dumps(record, default=str, separators=(",", ":"))
        with self._lock:
            self.records.append(record)
            if not self._file.closed:
                self._file.write(line + "\n")
                self._file.flush()
        if self._echo is not None:
            self._echo(EVENT_TAG + line)
        return record

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy of the events this node emitted so far."""
        with self._lock:
            return list(self.records)

    def close(self) -> None:
        with self._lock:
            self._file.close()


EVENT_TAG = "event "
"""Starts an agent output line that carries one event (``stalwart run --log-events``)."""


def parse_event_line(text: str) -> dict[str, Any] | None:
    """The event in an agent output line ``[stalwart NODE] event {...}``, else None."""
    if not text.startswith("[stalwart "):
        return None
    _, sep, rest = text.partition("] ")
    if not sep or not rest.startswith(EVENT_TAG):
        return None
    try:
        rec = json.loads(rest[len(EVENT_TAG) :])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "time" in rec and "event" in rec else None


def load_events(log_dir: str) -> list[dict[str, Any]]:
    """Read every node's events under ``log_dir``, sorted by time. Bad lines are skipped."""
    events: list[dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(log_dir, "events-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "time" in rec and "event" in rec:
                    events.append(rec)
    events.sort(key=lambda r: r["time"])
    return events


@dataclass
class Incident:
    """The recovery into ``generation``: its cause and, per node, when each phase ended."""

    generation: int
    start: float
    cause: str
    nodes: dict[str, dict[str, float]] = field(default_factory=dict)
    recovered_at: float | None = None
    reloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per node: the checkpoint its workers reloaded (``step``, ``tier``, ``seconds``)."""

    @property
    def seconds(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.start

    def phases(self, node: str) -> dict[str, float | None]:
        """Seconds spent in each phase on ``node`` (None where the phase did not happen)."""
        marks = self.nodes.get(node, {})
        out: dict[str, float | None] = {}
        prev = self.start
        for phase, key in zip(
            _PHASES,
            ("restart", "workers_stopped", "rendezvous", "workers_started", "first_step"),
            strict=True,
        ):
            t = marks.get(key)
            out[phase] = None if t is None else max(0.0, t - prev)
            if t is not None:
                prev = t
        return out


def summarize(events: Iterable[dict[str, Any]]) -> list[Incident]:
    """Group events into incidents, one per generation >= 1 that some node restarted into."""
    by_gen: dict[int, Incident] = {}
    faults: dict[int, list[dict[str, Any]]] = defaultdict(list)
    pending: dict[str, float] = {}  # node -> time of its last restart, waiting for a generation
    marks: dict[str, dict[str, float]] = defaultdict(dict)
    for ev in events:
        node, kind, t = str(ev.get("node")), ev.get("event"), float(ev["time"])
        gen = int(ev.get("generation", 0))
        if kind == "fault" and ev.get("verdict", "restart") != "continue":
            faults[gen + 1].append(ev)
        elif kind == "restart":
            pending[node] = t
            marks[node] = {"restart": t}
        elif kind == "workers_stopped" and node in pending:
            marks[node]["workers_stopped"] = t
        elif kind == "rendezvous" and node in pending:
            marks[node]["rendezvous"] = t
            inc = by_gen.get(gen)
            if inc is None:
                cause_ev = min(faults.get(gen, []), key=lambda e: e["time"], default=None)
                cause = _describe(cause_ev) if cause_ev else str(ev.get("reason") or "peer restart")
                start = min(
                    [pending[node]] + [_fault_time(e) for e in faults.get(gen, [])],
                )
                inc = by_gen[gen] = Incident(generation=gen, start=start, cause=cause)
            inc.start = min(inc.start, pending.pop(node))
            inc.nodes[node] = marks[node]
        elif kind == "workers_started" and gen in by_gen and node in by_gen[gen].nodes:
            by_gen[gen].nodes[node]["workers_started"] = t
        elif kind == "checkpoint_loaded" and gen in by_gen and node in by_gen[gen].nodes:
            by_gen[gen].reloads[node] = {k: ev.get(k) for k in ("step", "tier", "seconds")}
        elif kind == "first_step" and gen in by_gen and node in by_gen[gen].nodes:
            inc = by_gen[gen]
            inc.nodes[node].setdefault("first_step", t)
            inc.recovered_at = t if inc.recovered_at is None else max(inc.recovered_at, t)
    return [by_gen[g] for g in sorted(by_gen)]


def _fault_time(ev: dict[str, Any]) -> float:
    fault = ev.get("fault") or {}
    return float(fault.get("observed_at") or ev["time"])


def _describe(ev: dict[str, Any]) -> str:
    fault = ev.get("fault") or {}
    where = f" rank {fault['rank']}" if fault.get("rank") is not None else ""
    return f"{fault.get('kind', '?')}{where} on {ev.get('node')}: {fault.get('message', '')}".strip()


def checkpoint_summary(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The job's checkpoints as its workers reported them: the last save and load, and how many
    saves failed or checkpoints were skipped (with the last such event). Empty when none."""
    out: dict[str, Any] = {}
    counts = {"checkpoint_failed": 0, "checkpoint_mirror_failed": 0, "checkpoint_corrupt": 0}
    for e in events:
        kind = e.get("event")
        if kind in ("checkpoint_saved", "checkpoint_loaded"):
            out["last_saved" if kind == "checkpoint_saved" else "last_loaded"] = _without_generation(e)
        elif kind in counts:
            counts[kind] += 1
            out["last_problem"] = _without_generation(e)
    if out:
        out["failed_saves"] = counts["checkpoint_failed"]
        out["failed_mirror_copies"] = counts["checkpoint_mirror_failed"]
        out["skipped_on_load"] = counts["checkpoint_corrupt"]
    return out


def _without_generation(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k != "generation"}


def describe_events(
    events: list[dict[str, Any]], last: int = 3
) -> tuple[tuple[dict[str, Any], ...], tuple[tuple[dict[str, Any], ...], ...], str]:
    """What ``stalwart job describe`` shows of a job's events (sorted by time): one record per
    restart, the events of the ``last`` incidents, and their phase table ("" when none)."""
    history = tuple(
        {k: e.get(k) for k in ("time", "node", "generation", "reason", "from_generation") if k in e}
        for e in events
        if e.get("event") == "restart"
    )
    summary = summarize(events)[-last:]
    incidents = []
    for inc in summary:
        end = (inc.recovered_at if inc.recovered_at is not None else float("inf")) + 0.001
        incidents.append(
            tuple(
                e
                for e in events
                if inc.start - 0.001 <= e["time"] <= end
                and int(e.get("generation", 0)) in (inc.generation - 1, inc.generation)
                and e.get("event") not in ("budget",)
                and not (e.get("event") == "first_step" and int(e.get("generation", 0)) < inc.generation)
            )
        )
    return history, tuple(incidents), format_incidents(summary) if summary else ""


def format_incidents(incidents: list[Incident]) -> str:
    """Render incidents as text: one block per incident, one row per node, seconds per phase."""
    if not incidents:
        return "no incidents: the workers were never restarted"
    lines = []
    for inc in incidents:
        total = f"{inc.seconds:.2f} s" if inc.seconds is not None else "not recovered"
        lines.append(f"incident -> generation {inc.generation}: {inc.cause}")
        lines.append(f"  recovery: {total}")
        header = "  " + "node".ljust(24) + "".join(p.rjust(12) for p in _PHASES)
        lines.append(header)
        for node in sorted(inc.nodes):
            cells = "".join(("-" if v is None else f"{v:.2f}").rjust(12) for v in inc.phases(node).values())
            lines.append("  " + node[:24].ljust(24) + cells)
        for node, r in sorted(inc.reloads.items()):  # part of the first_step phase
            seconds = f" in {r['seconds']:.2f} s" if isinstance(r.get("seconds"), int | float) else ""
            lines.append(
                f"  {node[:24]}: reloaded checkpoint step {r.get('step')} from the {r.get('tier')}{seconds}"
            )
    return "\n".join(lines)


@click.command(name="events")
@click.argument("log_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print incidents as JSON.")
def events_command(log_dir: str, as_json: bool) -> None:
    """Print the per-incident recovery timeline of LOG_DIR (all nodes' events-*.jsonl)."""
    if not glob.glob(os.path.join(log_dir, "events-*.jsonl")):
        raise click.ClickException(
            f"no events-*.jsonl files in {log_dir!r}; pass the --log-dir given to 'stalwart run'"
        )
    incidents = summarize(load_events(log_dir))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "generation": i.generation,
                        "cause": i.cause,
                        "start": i.start,
                        "seconds": i.seconds,
                        "nodes": {n: i.phases(n) for n in i.nodes},
                        "reloads": i.reloads,
                    }
                    for i in incidents
                ],
                indent=2,
            )
        )
    else:
        click.echo(format_incidents(incidents))
