"""``StalwartAgent``: torch elastic's ``SimpleElasticAgent`` with reliable, budgeted restarts.

torch does the rendezvous (c10d, static, etcd handlers) and rank assignment. This class fills the
start/stop/monitor hooks with its own processes (piped output, report socket, PDEATHSIG), gives
every generation a fresh workers' store (``jobstore``), and runs the loop: observe (workers,
monitors, peers), ``policy.decide``, execute, record (timeline, metrics).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry
from torch.distributed.elastic.agent.server.api import (
    DEFAULT_ROLE,
    RunResult,
    SimpleElasticAgent,
    WorkerGroup,
    WorkerSpec,
    WorkerState,
)
from torch.distributed.elastic.multiprocessing import Std
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
)

from stalwart.agent import policy
from stalwart.agent.api import AgentConfig, ScriptFailed
from stalwart.agent.failures import WorkerFailure, exit_fault, format_failure
from stalwart.agent.jobstore import JobStore
from stalwart.agent.peers import RESTART, PeerRestarts
from stalwart.agent.policy import AgentState, Budget, Decision, Verdict
from stalwart.agent.procs import ExitWatcher, OutputPump, make_launcher, stop_processes
from stalwart.agent.rendezvous import backend_store
from stalwart.agent.status import AgentMetrics, StatusServer
from stalwart.agent.timeline import Timeline, format_incidents, load_events, summarize
from stalwart.agent.workerenv import error_file, launch_spec, run_script
from stalwart.errors import ConfigError, SignalReceived
from stalwart.health.api import Fault, MonitorContext
from stalwart.worker import api as wapi
from stalwart.worker.channel import ReportReceiver

__all__ = ["StalwartAgent", "rendezvous_exit"]

_WORKER_EVENT = re.compile(r"[a-z][a-z0-9_]{0,47}")
_AGENT_EVENTS = frozenset(
    ("fault", "restart", "workers_stopped", "rendezvous", "workers_started", "first_step", "budget", "exit")
)

logger = logging.getLogger(__name__)

# How long a node whose budget is spent waits for the other nodes' faults of the same incident
# before the earliest one hands itself over (see ``JobStore.elect_handover``). A peer's workers
# fail milliseconds after the culprit's, but the culprit may say so up to a second later (its
# killed worker's pipes, see ``_failures``); the wait ends early once every node said its own.
_HANDOVER_SETTLE_S = 3.0


def _wants(spec: Any, local_rank: int, std: Std) -> bool:
    value = spec.get(local_rank, Std.NONE) if isinstance(spec, dict) else (spec or Std.NONE)
    return bool(value.value & std.value)


class StalwartAgent(SimpleElasticAgent):
    """One node's agent. ``execute()`` runs the job and returns the process exit code."""

    def __init__(self, config: AgentConfig, spec: WorkerSpec) -> None:
        super().__init__(spec, exit_barrier_timeout=config.exit_barrier_timeout)
        self.cfg = config
        self.registry = CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.timeline = Timeline(config.log_dir, config.node, echo=self._say if config.log_events else None)
        self._jobstore = JobStore(config.run_id)
        self._launcher = make_launcher(config.standby, config.standby_preload, config.worker_env)
        self._lock = threading.Lock()
        self._console_lock = threading.Lock()
        self._wake = threading.Event()  # a worker exited or a peer restarts: look now
        self._exits = ExitWatcher(self._on_worker_exit)
        self._peers = PeerRestarts(self._jobstore.connect_apart, self._wake.set)
        self._state = AgentState.INIT
        self._generation = -1
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._pumps: dict[int, OutputPump] = {}
        self._exited_at: dict[int, float] = {}
        self._last_step: dict[int, int] = {}
        self._gen_started = 0.0
        self._first_step_seen = False
        self._incident_start: float | None = None
        self._incidents: list[dict[str, Any]] = []
        self._startup_retries = 1
        self._last_startup_sig: str | None = None
        self._exit_code = policy.EXIT_OK
        self._exit_reason = "workers succeeded"
        self._summary = ""
        self._root_cause: WorkerFailure | None = None
        self._sock_dir = tempfile.mkdtemp(prefix="stalwart-")
        self._receiver = ReportReceiver(os.path.join(self._sock_dir, "reports.sock"), self._on_report)
        self._status: StatusServer | None = None

    # -- public -------------------------------------------------------------------------------

    def execute(self) -> int:
        """Run the job to its end; returns the exit code (see ``stalwart.agent.policy``)."""
        previous = {s: signal.signal(s, self._on_signal) for s in self.cfg.signals}
        try:
            self._start_services()
            try:
                self.run(self.cfg.role)
            except SignalReceived as exc:
                self._exit_code = 0 if self._workers_all_ok() else 128 + exc.sigval
                self._exit_reason = f"stopped by signal {signal.Signals(exc.sigval).name}"
            except RendezvousGracefulExitError as exc:
                self._exit_reason = f"rendezvous exited gracefully: {exc}"
            except RendezvousClosedError:
                self._set_exit(*self._ended_elsewhere())
            except RendezvousError as exc:
                self._set_exit(*rendezvous_exit(exc))
            except ScriptFailed as exc:
                self._set_exit(exc.exit_code, str(exc))
            except Exception as exc:
                # The store went away mid-operation, a monitor blew up...: still stop cleanly.
                logger.exception("agent error")
                self._set_exit(policy.EXIT_FAILED, f"agent error: {type(exc).__name__}: {exc}")
            self._finish()
            return self._exit_code
        finally:
            self.timeline.close()
            for s, h in previous.items():
                signal.signal(s, h)

    def snapshot(self) -> dict[str, Any]:
        """The ``/status`` document."""
        with self._lock:
            used = self.cfg.max_restarts - self._remaining_restarts
            workers = [
                {
                    "local_rank": lr,
                    "pid": p.pid,
                    "state": "running" if p.poll() is None else f"exited({p.returncode})",
                    "last_step": self._last_step.get(lr),
                }
                for lr, p in sorted(self._procs.items())
            ]
            return {
                "node": self.cfg.node,
                "state": self._state.value,
                "generation": self._generation,
                "restarts": used,
                "budget": {
                    "max_restarts": self.cfg.max_restarts,
                    "used": used,
                    "remaining": self._remaining_restarts,
                },
                "incidents": list(self._incidents[-20:]),
                "workers": workers,
            }

    # -- services -----------------------------------------------------------------------------

    def _start_services(self) -> None:
        if self.cfg.status_port is not None:
            try:
                self._status = StatusServer(
                    self.cfg.status_host, self.cfg.status_port, self.snapshot, self.registry
                )
            except OSError as exc:
                raise ConfigError(
                    f"--status-host/--status-port: cannot listen on {self.cfg.status_host}:"
                    f"{self.cfg.status_port} ({exc}); pick a free port, or 0 to turn the endpoint off"
                ) from exc
            self._status.start()
            host, port = self._status.address
            url = f"http://{host}:{port}"
            with open(os.path.join(self.cfg.log_dir, f"status-{self.cfg.node}.url"), "w") as f:
                f.write(url + "\n")
            self._say(f"status at {url}/status and {url}/metrics")
        self._receiver.start()
        self._launcher.start()

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise SignalReceived(signum)

    def _say(self, msg: str) -> None:
        with self._console_lock:
            print(f"[stalwart {self.cfg.node}] {msg}", file=sys.stderr, flush=True)

    def _set_state(self, state: AgentState) -> None:
        with self._lock:
            self._state = state

    def _set_exit(self, code: int, reason: str) -> None:
        self._exit_code, self._exit_reason = code, reason

    def _record_end(self) -> None:
        """Tell the other nodes why this node ends the job, so they exit with the same code."""
        try:
            self._jobstore.record_end(self._exit_code, self._exit_reason, self.cfg.node)
        except Exception as exc:  # before the first rendezvous, or the store is gone
            logger.debug("could not record the end of the job: %s", exc)

    def _recorded_end(self) -> tuple[int, str] | None:
        """(exit code, reason) that the node which ended the job recorded, if it could."""
        try:
            self._jobstore.attach(backend_store(self._worker_group.spec.rdzv_handler))
            ended = self._jobstore.ended()
        except Exception:  # the store went with the node that hosted it
            return None
        if ended is None:
            return None
        code, reason, node = ended
        return code, f"node {node} ended the job: {reason}"

    def _ended_elsewhere(self) -> tuple[int, str]:
        """Exit code and reason after another node closed the rendezvous: that node's, if known."""
        return self._recorded_end() or (
            policy.EXIT_FAILED,
            "the rendezvous was closed by another node (job ended)",
        )

    def _ended_by_another_node(self, wg: WorkerGroup) -> tuple[int, str] | None:
        """(exit code, reason) when another node closed the rendezvous, recording a failure."""
        return self._recorded_end() if wg.spec.rdzv_handler.is_closed() else None

    # -- the loop -----------------------------------------------------------------------------

    def _invoke_run(self, role: str = DEFAULT_ROLE) -> RunResult:
        wg = self._worker_group
        self._initialize_workers(wg)
        while True:
            self._wake.wait(wg.spec.monitor_interval)
            self._wake.clear()
            result = self._monitor_workers(wg)
            wg.state = result.state
            now = time.time()
            if result.state == WorkerState.SUCCEEDED:
                return self._succeed(result)
            faults: list[Fault] = []
            if result.state == WorkerState.FAILED:
                faults.append(self._exit_fault())
            for monitor in self.cfg.monitors:
                try:
                    faults.extend(monitor.poll(now))
                except SignalReceived:
                    raise
                except Exception:
                    logger.exception("monitor %s failed to poll", getattr(monitor, "name", monitor))
            decision = self._decide(faults, now)
            if decision is not None and decision[1].verdict is Verdict.EXIT:
                fault, d = decision
                if d.exit_code in policy.HAND_OVER_CODES:
                    # before the workers stop: the other nodes' workers fail next, and their
                    # decisions find this and follow it instead of spending or electing
                    self._announce(RESTART)
                self._stop_workers(wg)
                self._fail(fault, d, result)
                return result
            if decision is not None and decision[1].verdict is Verdict.RESTART:
                self._restart(*decision)
            elif self._peers.announced(self._generation):
                self._restart(None, Decision(Verdict.RESTART, "another node announced a restart"))
            elif wg.spec.rdzv_handler.num_nodes_waiting() > 0:
                self._restart(None, Decision(Verdict.RESTART, "another node is re-rendezvousing"))
            elif (ended := self._ended_by_another_node(wg)) is not None:
                # while these workers run, or wait for peers that will not come
                self._stop_workers(wg)
                self._set_state(AgentState.FAILED)
                self._set_exit(*ended)
                return result

    def _decide(self, faults: list[Fault], now: float) -> tuple[Fault, Decision] | None:
        """The strongest decision over ``faults`` (exit > restart > continue), each recorded."""
        best: tuple[Fault, Decision] | None = None
        rank = {Verdict.CONTINUE: 0, Verdict.RESTART: 1, Verdict.EXIT: 2}
        budget = Budget(
            self.cfg.max_restarts, self._jobstore.restarts_used(), startup_retries=self._startup_retries
        )
        followed: bool | None = None  # another node announced a restart out of this generation
        for fault in faults:
            d = policy.decide(self._state, fault, budget, now, self.cfg.ladder)
            if (d.spends_budget or d.exit_code == policy.EXIT_BUDGET_SPENT) and followed is None:
                followed = self._restart_announced()
            if (d.spends_budget or d.exit_code == policy.EXIT_BUDGET_SPENT) and followed:
                # another node restarts or hands itself over, and this node's workers failed with
                # it: follow, as on its announcement alone (its restart counted itself, if it does)
                d = Decision(Verdict.RESTART, f"{fault.kind.value}: following another node's restart")
            elif d.exit_code == policy.EXIT_BUDGET_SPENT and self._jobstore.restart_claimed(self._generation):
                # Another node already spent the budget on this very incident: follow its restart.
                d = Decision(Verdict.RESTART, f"{fault.kind.value}: joining another node's restart")
            elif d.exit_code == policy.EXIT_BUDGET_SPENT and not self._jobstore.elect_handover(
                self._generation,
                self.cfg.node,
                fault.observed_at,
                self._worker_group.group_world_size or 1,
                _HANDOVER_SETTLE_S,
            ):
                # One incident fails the workers of every node, but one pod is enough to hand
                # over (each costs the job's backoffLimit): the node whose fault came first
                # does, the others wait in the rendezvous for its replacement.
                d = Decision(
                    Verdict.RESTART,
                    f"{fault.kind.value}: another node handed itself over; waiting for its replacement",
                )
            self.timeline.emit(
                "fault", self._generation, fault=fault.to_json(), verdict=d.verdict.value, decision=d.reason
            )
            if d.verdict is not Verdict.CONTINUE:  # advisory faults are logged by their monitor
                self._say(f"{fault.kind.value}: {fault.message} -> {d.verdict.value} ({d.reason})")
            if best is None or rank[d.verdict] > rank[best[1].verdict]:
                best = (fault, d)
        return best

    def _announce(self, value: bytes) -> None:
        """Tell the other nodes of this generation: ``RESTART`` (this node restarts or hands
        over: come to the next round now), or ``b"end"`` (it leaves for good: stop watching)."""
        if self._generation < 0:
            return
        try:
            self._jobstore.announce(self._generation, self._worker_group.group_world_size or 1, value)
        except SignalReceived:
            raise
        except Exception as exc:  # the store is gone: the other nodes find out by polling
            logger.debug("could not tell the other nodes: %s", exc)

    def _exit_fault(self) -> Fault:
        fault, self._root_cause = exit_fault(self._failures(), self._last_startup_sig, self.cfg.node)
        return fault

    def _failures(self) -> list[WorkerFailure]:
        out = []
        # let the tracebacks arrive: at most a second in all (a killed worker's children, a
        # DataLoader's, may hold its pipes open for longer)
        deadline = time.monotonic() + 1.0
        for w in self._worker_group.workers:
            p = self._procs.get(w.local_rank)
            if p is None or p.returncode in (None, 0):
                continue
            self._pumps[w.local_rank].join(timeout=max(0.0, deadline - time.monotonic()))
            exited = self._exited_at.get(w.local_rank, time.time())
            out.append(
                WorkerFailure.build(
                    rank=w.global_rank,
                    local_rank=w.local_rank,
                    pid=p.pid,
                    exitcode=p.returncode,
                    exited_at=exited,
                    startup=w.local_rank not in self._last_step
                    and exited - self._gen_started < self.cfg.startup_window,
                    stderr_tail=list(self._pumps[w.local_rank].stderr_tail),
                    error_file=error_file(self.cfg, self._generation, w.global_rank),
                )
            )
        return out

    def _restart_announced(self) -> bool:
        """Whether another node announced a restart out of this generation: heard, or under this
        node's wake key now (the watching thread may not have woken yet)."""
        gen = self._generation
        if self._peers.announced(gen):
            return True
        try:
            return self._jobstore.restart_announced(gen, self._worker_group.group_rank)
        except SignalReceived:
            raise
        except Exception as exc:  # the store is gone: nothing heard (the caller goes on as alone)
            logger.debug("could not read this node's wake key: %s", exc)
            return False

    def _restart(self, fault: Fault | None, decision: Decision) -> None:
        """Stop this node's workers and start the next generation's, telling the other nodes
        first unless another node already did (every node heard that: saying it again would
        cost the store N writes per node)."""
        wg = self._worker_group
        self._set_state(AgentState.RESTARTING)
        reason = fault.kind.value if fault is not None else "peer"
        started = fault.observed_at if fault is not None else time.time()
        self._incident_start = min(started, time.time())
        self.timeline.emit(
            "restart", self._generation, reason=decision.reason, from_generation=self._generation
        )
        if decision.spends_budget:
            _, used = self._jobstore.claim_restart(self._generation)
        else:
            used = self._jobstore.restarts_used()
        # after the claim (the others read the budget it spent), before stopping the workers (the
        # other nodes stop theirs meanwhile)
        if not self._restart_announced():
            self._announce(RESTART)
        if decision.rung is policy.Rung.STARTUP_RETRY and fault is not None:
            self._startup_retries -= 1
        if fault is not None and fault.evidence.get("startup"):
            self._last_startup_sig = str(fault.evidence.get("signature"))
        with self._lock:
            self._remaining_restarts = max(0, self.cfg.max_restarts - used)
            self._incidents.append(
                {"from_generation": self._generation, "reason": decision.reason, "started_at": started}
            )
        self.metrics.restarts.labels(reason=reason).inc()
        self.timeline.emit("budget", self._generation, used=used, max=self.cfg.max_restarts)
        self._stop_workers(wg)
        wg.state = WorkerState.STOPPED
        self._initialize_workers(wg)

    def _succeed(self, result: RunResult) -> RunResult:
        self._set_state(AgentState.SUCCEEDED)
        self._announce(b"end")  # before the exit barrier: no node's watch outlives the store's host
        self._stop_workers(self._worker_group)
        self._exit_barrier()
        if self.cfg.post_train:
            self._say(f"running post-train script: {' '.join(self.cfg.post_train)}")
            run_script(self.cfg, "post-train", self.cfg.post_train, self._generation)
        self._set_exit(policy.EXIT_OK, "workers succeeded")
        return result

    def _fail(self, fault: Fault, decision: Decision, result: RunResult) -> None:
        self._set_state(AgentState.FAILED)
        lines = [decision.reason]
        cause = self._root_cause
        if fault.source == "agent" and cause is not None:
            lines.append(format_failure(cause, self.cfg.node))
        else:
            lines.append(f"  {fault.kind.value} from {fault.source}: {fault.message} {dict(fault.evidence)}")
        self._summary = "\n".join(lines)
        self._set_exit(decision.exit_code or policy.EXIT_FAILED, decision.reason)

    def _finish(self) -> None:
        self.timeline.emit("exit", self._generation, code=self._exit_code, reason=self._exit_reason)
        if self._exit_code != 0:
            self._say(f"job failed (exit code {self._exit_code}): {self._summary or self._exit_reason}")
        else:
            self._say(f"done: {self._exit_reason}")
        incidents = summarize(load_events(self.cfg.log_dir))
        if incidents:
            self._say("recovery timeline:\n" + format_incidents(incidents))

    # -- elastic hooks ------------------------------------------------------------------------

    def _rendezvous(self, worker_group: WorkerGroup) -> None:
        self._set_state(AgentState.RENDEZVOUS)
        super()._rendezvous(worker_group)
        static = worker_group.spec.rdzv_handler.get_backend() == "static"
        gen = self._jobstore.sync_generation(
            worker_group.store, worker_group.group_rank, worker_group.group_world_size, fresh_round=not static
        )
        if worker_group.group_rank == 0:
            host, port = self._jobstore.host_worker_store(worker_group.store, gen, self.cfg.worker_host)
        else:
            host, port = self._jobstore.worker_store_address(worker_group.store, gen)
        worker_group.master_addr, worker_group.master_port = host, port
        with self._lock:
            self._generation = gen
            self._remaining_restarts = max(0, self.cfg.max_restarts - self._jobstore.restarts_used())
        self.metrics.generation.set(gen)
        self._peers.follow(gen, self._jobstore.wake_key(gen, worker_group.group_rank))
        self.timeline.emit(
            "rendezvous", gen, group_rank=worker_group.group_rank, world_size=worker_group.group_world_size
        )

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        gen = self._generation
        if self.cfg.pre_train:
            self._say(f"running pre-train script: {' '.join(self.cfg.pre_train)}")
            run_script(self.cfg, "pre-train", self.cfg.pre_train, gen)
        with self._lock:  # the last generation's workers are stopped; a late exit of one is not news
            self._procs.clear()
            self._exited_at.clear()
            self._wake.clear()
        if self._peers.announced(gen):  # heard while the round completed or the script ran
            self._wake.set()
        self._last_step.clear()
        self._first_step_seen = False
        self._gen_started = time.time()
        ctx = MonitorContext(
            node=self.cfg.node,
            local_world_size=self.cfg.nproc_per_node,
            global_ranks={w.local_rank: w.global_rank for w in worker_group.workers},
            worker_pids={},
            log_dir=self.cfg.log_dir,
            generation=gen,
            registry=self.registry,
        )
        # monitors start before the first worker does: a line printed at once (an import error,
        # a CUDA error at start-up) reaches rules that are already running
        for monitor in self.cfg.monitors:
            monitor.start(ctx)
        ids: dict[int, Any] = {}
        for w in worker_group.workers:
            proc = self._launcher.launch(
                launch_spec(self.cfg, worker_group, w.local_rank, gen, self._receiver.path)
            )
            with self._lock:
                self._procs[w.local_rank] = proc
            self._exits.watch((w.local_rank, proc), proc.pid)
            prefix = f"[{self.cfg.node}/{w.global_rank}]"
            log_path = os.path.join(
                self.cfg.log_dir, self.cfg.node, f"gen-{gen}", f"rank-{w.global_rank}.log"
            )
            show = self.cfg.local_ranks_filter is None or w.local_rank in self.cfg.local_ranks_filter
            self._pumps[w.local_rank] = OutputPump(
                proc,
                w.local_rank,
                prefix,
                log_path,
                echo_out=show and self._echo(w.local_rank, Std.OUT),
                echo_err=show and self._echo(w.local_rank, Std.ERR),
                on_line=self._on_line,
                console_lock=self._console_lock,
            )
            ids[w.local_rank] = proc.pid
        ctx.worker_pids = dict(ids)
        self.metrics.workers.labels(state="running").set(len(ids))
        self._set_state(AgentState.RUNNING)
        self.timeline.emit("workers_started", gen, pids=ids)
        return ids

    def _echo(self, local_rank: int, std: Std) -> bool:
        return not _wants(self.cfg.redirects, local_rank, std) or _wants(self.cfg.tee, local_rank, std)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        failures: dict[int, Any] = {}
        values: dict[int, Any] = {}
        now = time.time()
        for w in worker_group.workers:
            p = self._procs.get(w.local_rank)
            if p is None or p.poll() is None:
                continue
            self._exited_at.setdefault(w.local_rank, now)
            if p.returncode == 0:
                values[w.global_rank] = None
            else:
                failures[w.global_rank] = p.returncode
        running = len(worker_group.workers) - len(failures) - len(values)
        self.metrics.workers.labels(state="running").set(running)
        self.metrics.workers.labels(state="failed").set(len(failures))
        self.metrics.workers.labels(state="succeeded").set(len(values))
        if failures:
            return RunResult(state=WorkerState.FAILED)
        if running == 0:
            return RunResult(state=WorkerState.SUCCEEDED, return_values=values)
        return RunResult(state=WorkerState.HEALTHY)

    def _stop_workers(
        self, worker_group: WorkerGroup, sig: int = signal.SIGTERM, grace: float | None = None
    ) -> None:
        procs = list(self._procs.values())
        live = [p for p in procs if p.poll() is None]
        if procs:
            stop_processes(procs, sig, self.cfg.restart_grace if grace is None else grace)
        deadline = time.monotonic() + 2.0  # their output's last lines, at most 2 s in all
        for pump in self._pumps.values():
            pump.join(timeout=max(0.0, deadline - time.monotonic()))
        for monitor in self.cfg.monitors:
            try:
                monitor.stop()
            except SignalReceived:
                raise
            except Exception:
                logger.exception("monitor failed to stop")
        if live or (procs and self._state is AgentState.RESTARTING):
            self.timeline.emit("workers_stopped", self._generation)
        self.metrics.workers.labels(state="running").set(0)

    def _workers_all_ok(self) -> bool:
        return bool(self._procs) and all(p.poll() == 0 for p in self._procs.values())

    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
        # first: whatever fails below, no thread may be left blocked in the store at exit (torch
        # aborts the process when the store's host goes then)
        self._peers.close(lambda key: self._jobstore.base.set(key, b"end"))
        self._stop_workers(self._worker_group, death_sig, self.cfg.shutdown_timeout)
        self._jobstore.close_worker_store()
        self._launcher.close()
        self._exits.close()
        self._receiver.stop()
        if self._status is not None:
            self._status.stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def run(self, role: str = DEFAULT_ROLE) -> RunResult:
        """Run the loop; on a signal, forward it to the workers with the shutdown grace period."""
        shutdown_rdzv = True
        try:
            return self._invoke_run(role)
        except SignalReceived as exc:
            # Like torch: a signalled agent leaves the rendezvous open for a relaunched node.
            shutdown_rdzv = False
            self._set_state(AgentState.STOPPING)
            self._say(f"received {signal.Signals(exc.sigval).name}: stopping workers")
            self._stop_workers(self._worker_group, exc.sigval, self.cfg.shutdown_timeout)
            raise
        except ScriptFailed as exc:
            self._set_exit(exc.exit_code, str(exc))  # before the rendezvous closes: recorded below
            raise
        except RendezvousError as exc:
            if not isinstance(exc, RendezvousClosedError | RendezvousGracefulExitError):
                self._set_exit(*rendezvous_exit(exc))  # decides below whether to close it
            raise
        finally:
            self._shutdown()
            if self._exit_code in policy.HAND_OVER_CODES:
                # This node asks to be replaced: the others wait in the rendezvous for the
                # replacement instead of ending the job (closing it would fail them all).
                shutdown_rdzv = False
            with contextlib.suppress(SignalReceived):  # a second signal: the way out goes on
                # a hand-over: the others go to the rendezvous now, not at a timeout
                self._announce(RESTART if self._exit_code in policy.HAND_OVER_CODES else b"end")
            if shutdown_rdzv:
                if self._exit_code != policy.EXIT_OK:
                    self._record_end()
                self._worker_group.spec.rdzv_handler.shutdown()

    # -- worker callbacks (other threads) ------------------------------------------------------

    def _on_report(self, report: wapi.Report) -> None:
        if report.event is not None:  # not progress; kept whatever its generation (a final save)
            self._on_worker_event(report)
            return
        if report.generation != self._generation:
            return
        if wapi.METRIC_BUSY in report.metrics or wapi.METRIC_EXITING in report.metrics:
            # announcements, not steps: a busy(120) before the first step must not end the
            # recovery's timeline there, nor reset the start-up retry budget
            for monitor in self.cfg.monitors:
                monitor.on_report(report)
            return
        with self._lock:
            first = not self._first_step_seen
            self._first_step_seen = True
            self._last_step[report.local_rank] = report.step
            self._startup_retries = 1
            self._last_startup_sig = None
            incident_start = self._incident_start if first else None
            if first:
                self._incident_start = None
            if first and self._incidents and incident_start is not None:
                self._incidents[-1]["recovered_seconds"] = report.time - incident_start
                self._incidents[-1]["generation"] = self._generation
        if first:
            self.timeline.emit("first_step", report.generation, step=report.step, rank=report.rank)
            if incident_start is not None:
                self.metrics.recovery.observe(max(0.0, report.time - incident_start))
                self._observe_recovery_phases(report.generation)
        for monitor in self.cfg.monitors:
            monitor.on_report(report)

    def _on_worker_event(self, report: wapi.Report) -> None:
        """A worker's event (``stalwart.worker.event``): into the timeline and the metrics."""
        fields = dict(report.event or {})
        name = fields.pop("event", None)
        if not isinstance(name, str) or not _WORKER_EVENT.fullmatch(name) or name in _AGENT_EVENTS:
            return  # a malformed name, or one of the agent's own (the timeline reads those)
        for reserved in ("time", "node", "generation", "rank"):
            fields.pop(reserved, None)
        self.timeline.emit(name, report.generation, rank=report.rank, **fields)
        self.metrics.observe_checkpoint(name, fields)

    def _observe_recovery_phases(self, generation: int) -> None:
        for incident in summarize(self.timeline.snapshot()):
            if incident.generation == generation:
                for phase, seconds in incident.phases(self.timeline.node).items():
                    if seconds is not None:
                        self.metrics.recovery_phase.labels(phase=phase).observe(seconds)

    def _on_worker_exit(self, key: object, when: float) -> None:
        local_rank, proc = key  # type: ignore[misc]
        with self._lock:
            if self._procs.get(local_rank) is not proc:
                return  # a worker of an earlier generation, stopped by a restart
            self._exited_at.setdefault(local_rank, when)
        self._wake.set()

    def _on_line(self, local_rank: int, line: str) -> None:
        for monitor in self.cfg.monitors:
            monitor.on_line(local_rank, line)


def rendezvous_exit(exc: RendezvousError) -> tuple[int, str]:
    """Exit code and reason for a rendezvous that failed (not closed by another node).

    Waiting longer than ``join_timeout`` for the other nodes (a replacement that is slow to
    come), or not reaching the store (its pod still starting), asks for this node to be
    replaced and leaves the rendezvous open: exiting 1 would fail the whole job
    (``podFailurePolicy``) and closing the rendezvous would fail the replacement too.
    """
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RendezvousTimeoutError | RendezvousConnectionError):
        return policy.EXIT_REPLACE_NODE, f"rendezvous failed ({what}); handing this node over"
    return policy.EXIT_FAILED, f"rendezvous failed: {what}"
