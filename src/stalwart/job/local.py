"""The local backend: a job as N simulated nodes on this machine, each a detached agent.

Every node runs ``stalwart run`` on 127.0.0.1, joined through a c10d store that a process of its
own serves (``stalwart.job.store``), so that any node, node 0 included, can be replaced. With
``resources.gpus: G`` each node sees its own G GPUs (``CUDA_VISIBLE_DEVICES``); with 0, none.
State and logs live under the jobs directory (``$STALWART_HOME/jobs``, default
``~/.stalwart/jobs``)::

    <jobs>/<name>/job.yaml                 the resolved spec
    <jobs>/<name>/state.json               created_at, rendezvous port, node pids
    <jobs>/<name>/logs/                    every agent's --log-dir: events-node-<i>.jsonl, stacks,
                                           fault markers (shared, so a fault fires once per job)
    <jobs>/<name>/node-<i>/out.log         the agent's stdout and stderr (worker lines prefixed)
    <jobs>/<name>/node-<i>/{pid,exit.json} written by ``stalwart.job.node``
    <jobs>/<name>/store/                   the store's out.log, pid and exit.json
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from stalwart.errors import JobError, JobSubmitError
from stalwart.job.api import (
    JobDescription,
    JobExists,
    JobNotFound,
    JobState,
    JobStatus,
    LogLine,
    NodeStatus,
    parse_log_line,
)
from stalwart.job.command import job_env, launcher_argv, plain_torchrun, run_args
from stalwart.job.node import EXIT_FILE, PID_FILE
from stalwart.job.spec import JobSpec, parse_spec

__all__ = ["ENV_HOME", "LocalBackend", "assign_gpus", "default_jobs_dir", "visible_gpus"]

ENV_HOME = "STALWART_HOME"
_START_TIMEOUT_S = 10.0
_STORE_TIMEOUT_S = 60.0  # it imports torch; under load that takes seconds
_STOP_GRACE_S = 10.0


def default_jobs_dir() -> Path:
    """``$STALWART_HOME/jobs``, or ``~/.stalwart/jobs``; resolved at call time, never at import."""
    home = os.environ.get(ENV_HOME)
    return (Path(home) if home else Path.home() / ".stalwart") / "jobs"


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this machine offers: ``CUDA_VISIBLE_DEVICES`` if set, else every NVML device."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPUs
        return []


def assign_gpus(spec: JobSpec, available: list[str]) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` for each simulated node: disjoint slices of ``available``.

    ``resources.gpus: 0`` hides every GPU (the job runs on CPU with gloo).
    """
    per_node = spec.resources.gpus
    if per_node == 0:
        return [""] * spec.nodes.max
    need = per_node * spec.nodes.max
    if need > len(available):
        have = f"{len(available)} ({','.join(available)})" if available else "none"
        raise JobError(
            f"resources.gpus: {spec.nodes.max} local node(s) x {per_node} GPU(s) need {need} GPUs, "
            f"this machine offers {have}; lower nodes or resources.gpus (0 runs on CPU)"
        )
    return [",".join(available[i * per_node : (i + 1) * per_node]) for i in range(spec.nodes.max)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process(pid: int, started: float | None) -> Any:
    """The live ``psutil.Process`` for ``pid`` if it is still the process we started, else None."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return None  # the pid was reused
        return proc
    except psutil.Error:
        return None


class LocalBackend:
    """Runs jobs on this machine; ``jobs_dir`` overrides where their state lives."""

    name = "local"

    def __init__(
        self, jobs_dir: str | Path | None = None, gpus: Callable[[], list[str]] = visible_gpus
    ) -> None:
        self.jobs_dir = Path(jobs_dir) if jobs_dir else default_jobs_dir()
        self._gpus = gpus

    # -- helpers -----------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        d = self.jobs_dir / name
        if not (d / "state.json").is_file():
            raise JobNotFound(
                f"no local job named {name!r} in {self.jobs_dir}; see `stalwart job list` for the jobs there"
            )
        return d

    def _state(self, name: str) -> dict[str, Any]:
        return json.loads((self._dir(name) / "state.json").read_text())

    def _node_status(self, job_dir: Path, node: dict[str, Any]) -> NodeStatus:
        ndir = job_dir / node["name"]
        exit_path = ndir / EXIT_FILE
        if exit_path.is_file():
            rc = int(json.loads(exit_path.read_text())["returncode"])
            state = JobState.SUCCEEDED if rc == 0 else JobState.FAILED
            return NodeStatus(node["name"], state, node["pid"], rc, f"exited with status {rc}")
        if _process(node["pid"], node.get("started")) is not None:
            return NodeStatus(node["name"], JobState.RUNNING, node["pid"])
        return NodeStatus(
            node["name"], JobState.UNKNOWN, node["pid"], None, "process vanished without a status"
        )

    @staticmethod
    def _job_state(nodes: list[NodeStatus]) -> JobState:
        states = {n.state for n in nodes}
        if JobState.RUNNING in states:
            return JobState.RUNNING
        if states == {JobState.SUCCEEDED}:
            return JobState.SUCCEEDED
        if JobState.FAILED in states:
            return JobState.FAILED
        return JobState.UNKNOWN

    def _events(self, job_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
        from stalwart.agent.timeline import load_events

        return load_events(str(job_dir / "logs"))

    def _restarts(self, job_dir: Path, state: dict[str, Any], events: list[dict[str, Any]]) -> int:
        gens = {int(e.get("generation", 0)) for e in events if e.get("event") == "rendezvous"}
        if events:
            return max(0, len(gens) - 1) if gens else 0
        # No events (plain torchrun): count its per-attempt log directories; the busiest node wins.
        most = 0
        for run_dir in (job_dir / "logs").glob(f"{state['name']}_*"):
            most = max(most, len(list(run_dir.glob("attempt_*"))) - 1)
        return most

    def _status(self, name: str) -> tuple[JobStatus, list[NodeStatus], list[dict[str, Any]]]:
        job_dir = self._dir(name)
        state = self._state(name)
        nodes = [self._node_status(job_dir, n) for n in state["nodes"]]
        events = self._events(job_dir, state)
        job_state = self._job_state(nodes)
        failed = [n for n in nodes if n.state in (JobState.FAILED, JobState.UNKNOWN)]
        message = "; ".join(f"{n.name}: {n.detail}" for n in failed)
        status = JobStatus(
            name=name,
            backend=self.name,
            state=job_state,
            nodes=state["nodes_spec"],
            created_at=state["created_at"],
            restarts=self._restarts(job_dir, state, events),
            message=message,
            kind="local",
        )
        return status, nodes, events

    # -- Backend -----------------------------------------------------------------------------

    def create(self, spec: JobSpec) -> JobStatus:
        script = Path(spec.script)
        if not script.is_file():
            raise JobError(
                f"script: {spec.script} does not exist on this machine; check the path (cwd: {os.getcwd()})"
            )
        devices = assign_gpus(spec, self._gpus())
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        job_dir = self.jobs_dir / spec.name
        try:
            job_dir.mkdir()
        except FileExistsError:
            raise JobExists(
                f"a local job named {spec.name!r} already exists in {self.jobs_dir}; "
                f"delete it with `stalwart job delete {spec.name}` or pick another name"
            ) from None
        started: list[dict[str, Any]] = []  # the store first, then the nodes
        try:
            spec = spec.model_copy(update={"script": str(script.resolve())})
            (job_dir / "job.yaml").write_text(yaml.safe_dump(spec.dump(), sort_keys=False))
            (job_dir / "logs" / "faults").mkdir(parents=True)
            port = _free_port()
            env = dict(os.environ)
            env.update(job_env(spec))
            env.update(
                {
                    # stalwart run sets <log-dir>/faults itself; plain torchrun needs it here
                    "STALWART_FAULT_MARKER_DIR": str(job_dir / "logs" / "faults"),
                    # Workers must not reuse the agent's store across restarts (feasibility §2.3).
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                }
            )
            if sys.platform == "linux" and "GLOO_SOCKET_IFNAME" not in spec.env:
                env["GLOO_SOCKET_IFNAME"] = "lo"  # every simulated node is on this machine
            started.append(self._start_store(job_dir, port, spec.nodes.max, env))
            for i in range(spec.nodes.max):
                node_env = dict(env)
                if "CUDA_VISIBLE_DEVICES" not in spec.env:  # the user's own choice wins
                    node_env["CUDA_VISIBLE_DEVICES"] = devices[i]
                started.append(self._start_node(spec, job_dir, i, port, node_env))
            state = {
                "name": spec.name,
                "created_at": time.time(),
                "port": port,
                "nodes_spec": f"{spec.nodes} x {spec.nproc_per_node}",
                "cwd": os.getcwd(),
                "store": started[0],
                "nodes": started[1:],
            }
            tmp = job_dir / "state.json.tmp"
            tmp.write_text(json.dumps(state, indent=2))
            tmp.rename(job_dir / "state.json")
        except BaseException:
            self._kill_nodes(started)
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        return self.status(spec.name)

    def _start_store(self, job_dir: Path, port: int, nodes: int, env: dict[str, str]) -> dict[str, Any]:
        """Start the job's rendezvous store and wait until it listens."""
        argv = [sys.executable, "-m", "stalwart.job.store", str(port), str(job_dir), str(nodes)]
        store = self._detach("store", job_dir / "store", argv, env, replacements=0)
        deadline = time.monotonic() + _STORE_TIMEOUT_S
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return store
            if (job_dir / "store" / EXIT_FILE).exists() or time.monotonic() > deadline:
                raise JobSubmitError(
                    f"the job's rendezvous store did not start on port {port}; see "
                    f"{job_dir / 'store' / 'out.log'}"
                )
            time.sleep(0.05)

    def _start_node(
        self, spec: JobSpec, job_dir: Path, index: int, port: int, env: dict[str, str]
    ) -> dict[str, Any]:
        name = f"node-{index}"
        agent = launcher_argv() + run_args(
            spec,
            endpoint=f"127.0.0.1:{port}",
            is_host=False,  # the store has a process of its own (_start_store)
            local_addr="127.0.0.1",
            log_dir=str(job_dir / "logs"),
            node_name=name,
            torchrun=plain_torchrun(),
        )
        node_env = dict(env, STALWART_NODE=name)
        # a node that hands itself over is replaced up to backoffLimit times, as on Kubernetes
        return self._detach(name, job_dir / name, agent, node_env, spec.restart.max_restarts)

    @staticmethod
    def _detach(
        name: str, ndir: Path, command: list[str], env: dict[str, str], replacements: int
    ) -> dict[str, Any]:
        """Run ``command`` as a detached ``stalwart.job.node`` in ``ndir``; its state record."""
        ndir.mkdir()
        replace = ["--replacements", str(replacements)]
        argv = [sys.executable, "-m", "stalwart.job.node", *replace, str(ndir), "--", *command]
        with (ndir / "out.log").open("ab") as out:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                timeout=_START_TIMEOUT_S, check=False,
            )  # fmt: skip
        pid_path = ndir / PID_FILE
        if proc.returncode != 0 or not pid_path.is_file():
            raise JobSubmitError(f"{name} did not start (status {proc.returncode}); see {ndir / 'out.log'}")
        pid = int(pid_path.read_text())
        p = _process(pid, None)
        return {
            "name": name,
            "pid": pid,
            "started": p.create_time() if p is not None else None,
            "argv": command,
        }

    @staticmethod
    def _kill_nodes(nodes: list[dict[str, Any]], grace: float = _STOP_GRACE_S) -> None:
        """SIGTERM each node's supervisor (it forwards to its agent), then SIGKILL what is left.

        Workers live in sessions of their own, so the whole tree is collected before signalling.
        """
        import psutil

        from stalwart.launcher.pid1 import terminate_processes

        tops: list[psutil.Process] = []
        procs: list[psutil.Process] = []
        for node in nodes:
            top = _process(node["pid"], node.get("started"))
            if top is None:
                continue
            try:
                tree = [top, *top.children(recursive=True)]
            except psutil.Error:
                tree = [top]
            tops.append(top)
            procs += tree
        terminate_processes(tops, procs, grace)

    def list(self) -> list[JobStatus]:
        if not self.jobs_dir.is_dir():
            return []
        out = []
        for d in sorted(self.jobs_dir.iterdir()):
            if (d / "state.json").is_file():
                try:
                    out.append(self.status(d.name))
                except (JobError, ValueError, KeyError):
                    continue  # half-written or foreign directory: not a job we can show
        return out

    def status(self, name: str) -> JobStatus:
        return self._status(name)[0]

    def describe(self, name: str) -> JobDescription:
        from stalwart.agent.timeline import checkpoint_summary, describe_events

        status, nodes, events = self._status(name)
        job_dir = self._dir(name)
        history, incidents, timeline = describe_events(events)
        spec = yaml.safe_load((job_dir / "job.yaml").read_text())
        return JobDescription(
            status=status,
            node_states=tuple(nodes),
            history=history,
            incidents=incidents,
            where=str(job_dir),
            spec=spec,
            timeline=timeline,
            checkpoints=checkpoint_summary(events),
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        job_dir = self._dir(name)
        return self._events(job_dir, self._state(name))

    def logs(
        self, name: str, *, follow: bool = False, node: str | None = None, rank: int | None = None
    ) -> Iterator[LogLine]:
        job_dir = self._dir(name)
        state = self._state(name)
        names = [n["name"] for n in state["nodes"]]
        if node is not None:
            wanted = node if node.startswith("node-") else f"node-{node}"
            if wanted not in names:
                raise JobError(f"job {name!r} has no node {node!r}; its nodes are {', '.join(names)}")
            names = [wanted]
        files = {n: job_dir / n / "out.log" for n in names}
        offsets = dict.fromkeys(names, 0)
        partial = dict.fromkeys(names, b"")
        while True:
            got = False
            for n, path in files.items():
                try:
                    with path.open("rb") as f:
                        f.seek(offsets[n])
                        data = f.read()
                except FileNotFoundError:
                    continue
                if not data:
                    continue
                got = True
                offsets[n] += len(data)
                *lines, partial[n] = (partial[n] + data).split(b"\n")
                for raw in lines:
                    line = parse_log_line(n, raw.decode(errors="replace").rstrip("\r"))
                    if line.matches(rank):
                        yield line
            if got:
                continue
            if not follow:
                break
            if self.status(name).state != JobState.RUNNING:
                follow = False  # one more pass drains what the nodes wrote last
                continue
            time.sleep(0.2)
        for n, rest in partial.items():
            if rest:
                line = parse_log_line(n, rest.decode(errors="replace"))
                if line.matches(rank):
                    yield line

    def delete(self, name: str) -> None:
        job_dir = self._dir(name)
        state = self._state(name)
        self._kill_nodes([*state["nodes"], *([state["store"]] if "store" in state else [])])
        shutil.rmtree(job_dir)

    def spec(self, name: str) -> JobSpec:
        """The spec a job was created with."""
        job_dir = self._dir(name)
        return parse_spec(yaml.safe_load((job_dir / "job.yaml").read_text()), str(job_dir / "job.yaml"))
