"""``stalwart job``: init, validate, create, list, describe, logs, events, delete.

A thin layer over the SDK (sdk.py). Exit codes: 0 success; 1 ``create --wait`` saw the job fail;
2 bad input or a failed operation; 3 no such job; 4 the job already exists. ``-o json`` prints
machine-readable output on stdout; errors always go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click

from stalwart.job.api import Backend, JobDescription, JobStatus
from stalwart.job.sdk import Job, get_backend
from stalwart.job.spec import SpecError, load_spec

__all__ = ["job"]

_ENV_BACKEND = "STALWART_JOB_BACKEND"


def _backend_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--backend",
            type=click.Choice(["local", "kubernetes"]),
            envvar=_ENV_BACKEND,
            default=None,
            help="Where jobs live (default: local, or the spec's backend for create).",
        ),
        click.option("--jobs-dir", type=click.Path(file_okay=False), help="Local jobs directory."),
        click.option("-n", "--namespace", help="Kubernetes namespace (default: default)."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Kubeconfig file."),
        click.option("--context", help="Kubeconfig context."),
        click.option(
            "--flavour",
            type=click.Choice(["hyperpod", "pytorchjob", "jobset", "batch"]),
            help="Only look at this Kubernetes object kind.",
        ),
    ]

    @functools.wraps(fn)
    def with_where(
        *args: Any,
        backend: str | None,
        jobs_dir: str | None,
        namespace: str | None,
        kubeconfig: str | None,
        context: str | None,
        flavour: str | None,
        **kwargs: Any,
    ) -> Any:
        return fn(*args, where=_Where(backend, jobs_dir, namespace, kubeconfig, context, flavour), **kwargs)

    wrapped: Callable[..., Any] = with_where
    for opt in reversed(opts):
        wrapped = opt(wrapped)
    return wrapped


def _output_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-o", "--output", type=click.Choice(["text", "json"]), default="text", help="Output format."
    )(fn)


def _spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "-f", "--file", "path", default="job.yaml", show_default=True, type=click.Path(dir_okay=False)
        ),
        click.option(
            "--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override any field (repeatable)."
        ),
        click.option("--name", help="Override name."),
        click.option("--image", help="Override image."),
        click.option("--nodes", help="Override nodes (N or MIN:MAX)."),
        click.option("--nproc-per-node", help="Override nproc_per_node."),
        click.option("--fault", help="Inject a fault (testing), e.g. crash:rank=1:step=20."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _overrides(sets: Iterable[str], **fields: str | None) -> list[str]:
    out = [f"{k}={v}" for k, v in fields.items() if v is not None]
    return out + list(sets)


@dataclass(frozen=True, slots=True)
class _Where:
    """Where jobs live: the backend options every command shares."""

    kind: str | None
    jobs_dir: str | None
    namespace: str | None
    kubeconfig: str | None
    context: str | None
    flavour: str | None

    def backend(self) -> Backend:
        return get_backend(
            self.kind or "local",
            jobs_dir=self.jobs_dir,
            namespace=self.namespace,
            kubeconfig=self.kubeconfig,
            context=self.context,
            flavour=self.flavour,
        )


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    age = max(0.0, time.time() - ts)
    if age < 120:
        return f"{age:.0f}s"
    if age < 7200:
        return f"{age / 60:.0f}m"
    if age < 172800:
        return f"{age / 3600:.0f}h"
    return f"{age / 86400:.0f}d"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(name="job", context_settings={"help_option_names": ["-h", "--help"]})
def job() -> None:
    """Create, watch and manage fault-tolerant jobs, on this machine or on Kubernetes."""


@job.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--name", default="my-job", show_default=True, help="Job name written into the file.")
@click.option("--force", is_flag=True, help="Overwrite an existing job.yaml.")
def init(directory: str, name: str, force: bool) -> None:
    """Write a commented DIRECTORY/job.yaml that validates as written."""
    from stalwart.job.scaffold import write_job_yaml
    from stalwart.job.spec import JobSpec

    try:
        JobSpec.model_validate({"apiVersion": "stalwart.dev/v1", "name": name, "script": "x"})
    except Exception:
        raise SpecError(
            [("name", f"{name!r} is not a valid job name (lower-case letters, digits, '-')")]
        ) from None
    path = write_job_yaml(directory, name=name, force=force)
    click.echo(f"wrote {path}; edit it, then: stalwart job validate -f {path}")


@job.command()
@_spec_options
@_output_option
def validate(
    path: str,
    sets: tuple[str, ...],
    name: str | None,
    image: str | None,
    nodes: str | None,
    nproc_per_node: str | None,
    fault: str | None,
    output: str,
) -> None:
    """Check a job spec and print every problem with its field path."""
    overrides = _overrides(
        sets, name=name, image=image, nodes=nodes, nproc_per_node=nproc_per_node, fault=fault
    )
    try:
        spec = load_spec(path, overrides)
    except SpecError as exc:
        if output == "json":
            _json({"valid": False, "problems": [{"field": f, "message": m} for f, m in exc.problems]})
            sys.exit(exc.exit_code)
        raise
    if output == "json":
        _json({"valid": True, "spec": spec.dump()})
    else:
        click.echo(
            f"{path}: valid: job {spec.name!r}, {spec.nodes} node(s) x {spec.nproc_per_node} process(es), "
            f"backend {spec.backend}"
            + (f" ({spec.kubernetes.flavour})" if spec.backend == "kubernetes" else "")
        )


@job.command()
@_spec_options
@_backend_options
@_output_option
@click.option(
    "--dry-run", is_flag=True, help="Print what would be created (manifests or commands); create nothing."
)
@click.option("--wait", is_flag=True, help="Wait for the job to finish; exit 1 if it failed.")
def create(
    path: str,
    sets: tuple[str, ...],
    name: str | None,
    image: str | None,
    nodes: str | None,
    nproc_per_node: str | None,
    fault: str | None,
    where: _Where,
    output: str,
    dry_run: bool,
    wait: bool,
) -> None:
    """Create a job from a spec file (default ./job.yaml)."""
    overrides = _overrides(
        sets, name=name, image=image, nodes=nodes, nproc_per_node=nproc_per_node, fault=fault
    )
    if where.kind:
        overrides.insert(0, f"backend={where.kind}")
    if where.flavour:
        overrides.insert(0, f"kubernetes.flavour={where.flavour}")
    if where.namespace:
        overrides.insert(0, f"kubernetes.namespace={where.namespace}")
    spec = load_spec(path, overrides)
    if dry_run:
        _dry_run(spec, output)
        return
    b = _Where(
        spec.backend,
        where.jobs_dir,
        spec.kubernetes.namespace,
        where.kubeconfig,
        where.context,
        spec.kubernetes.flavour,
    ).backend()
    j = Job(spec, backend=b)
    status = j.create()
    if output == "json":
        _json(status.to_dict())
    else:
        click.echo(f"job {spec.name!r} created on {b.name}: {status.state.value}")
        click.echo(
            f"  follow it: stalwart job logs {spec.name} --follow"
            + ("" if b.name == "local" else " --backend kubernetes")
        )
    if wait:
        while not (status := j.status()).state.finished:
            time.sleep(1.0)
        click.echo(f"job {spec.name!r} {status.state.value}", err=output == "json")
        sys.exit(0 if status.state.value == "succeeded" else 1)


def _dry_run(spec: Any, output: str) -> None:
    if spec.backend == "kubernetes":
        from stalwart.job.render import render

        objects = render(spec)
        if output == "json":
            _json(objects)
        else:
            import yaml

            click.echo(yaml.safe_dump_all(objects, sort_keys=False).rstrip())
        return
    from stalwart.job.command import job_env, launcher_argv, run_args

    store = [sys.executable, "-m", "stalwart.job.store", "PORT", "JOB_DIR", str(spec.nodes.max)]
    nodes = [
        launcher_argv()
        + run_args(
            spec, endpoint="127.0.0.1:PORT", is_host=False, local_addr="127.0.0.1", log_dir=f"node-{i}/logs"
        )
        for i in range(spec.nodes.max)
    ]
    if output == "json":
        _json({"store": store, "nodes": nodes, "env": job_env(spec)})
    else:
        import shlex

        click.echo(f"store: {shlex.join(store)}")
        for i, argv in enumerate(nodes):
            click.echo(f"node-{i}: {shlex.join(argv)}")


@job.command(name="list")
@_backend_options
@_output_option
def list_(
    where: _Where,
    output: str,
) -> None:
    """List jobs as a table."""
    jobs = Job.list(where.backend())
    if output == "json":
        _json([s.to_dict() for s in jobs])
        return
    if not jobs:
        click.echo("no jobs")
        return
    rows = [["NAME", "STATE", "NODES", "RESTARTS", "AGE", "KIND"]]
    rows += [[s.name, s.state.value, s.nodes, str(s.restarts), _when(s.created_at), s.kind] for s in jobs]
    click.echo(_table(rows))


def _print_description(d: JobDescription) -> None:
    s: JobStatus = d.status
    click.echo(f"Name:      {s.name}")
    click.echo(f"Backend:   {s.backend} ({d.where})")
    click.echo(f"State:     {s.state.value}" + (f"  ({s.message})" if s.message else ""))
    click.echo(f"Nodes:     {s.nodes}")
    created = datetime.fromtimestamp(s.created_at).isoformat(timespec="seconds") if s.created_at else "-"
    click.echo(f"Created:   {created}")
    click.echo(f"Restarts:  {s.restarts}")
    if d.node_states:
        rows = [["NODE", "STATE", "PID", "EXIT", "DETAIL"]]
        rows += [
            [
                n.name,
                n.state.value,
                str(n.pid or "-"),
                "-" if n.exit_code is None else str(n.exit_code),
                n.detail,
            ]
            for n in d.node_states
        ]
        click.echo("\n" + _table(rows))
    click.echo("\nRestart history:")
    if not d.history:
        click.echo("  none")
    for h in d.history:
        when = h.get("time") or h.get("lastTransitionTime")
        if isinstance(when, float | int):
            when = datetime.fromtimestamp(when).isoformat(timespec="milliseconds")
        rest = ", ".join(
            f"{k}={v}" for k, v in h.items() if k not in ("time", "lastTransitionTime") and v is not None
        )
        click.echo(f"  {when}  {rest}")
    if d.checkpoints:
        click.echo("\nCheckpoints:")
        for key, label in (("last_saved", "last saved"), ("last_loaded", "last loaded")):
            if key in d.checkpoints:
                click.echo(f"  {label + ':':<13}{_checkpoint_event(d.checkpoints[key])}")
        c = d.checkpoints
        click.echo(
            f"  {'problems:':<13}{c['failed_saves']} failed saves, {c['failed_mirror_copies']} failed "
            f"mirror copies, {c['skipped_on_load']} checkpoints skipped on load"
        )
        if "last_problem" in c:
            click.echo(f"  {'last problem:':<13}{_checkpoint_event(c['last_problem'])}")
    if d.timeline:
        click.echo("\nRecovery (seconds per phase):")
        click.echo("  " + d.timeline.replace("\n", "\n  "))
    if d.incidents:
        click.echo("\nLast incidents:")
        for inc in d.incidents:
            t0 = inc[0]["time"] if inc else 0.0
            click.echo("  ---")
            for ev in inc:
                extra = {k: v for k, v in ev.items() if k not in ("time", "node", "event", "generation")}
                detail = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extra.items())
                click.echo(
                    f"  +{ev['time'] - t0:7.3f}s  {ev.get('node', '?'):<10} {ev.get('event', '?'):<16} "
                    f"gen={ev.get('generation', '?')} {detail}"[:200]
                )


def _checkpoint_event(e: dict[str, Any]) -> str:
    """One checkpoint event as a line: what, where, when."""
    when = datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds") if "time" in e else "-"
    what = e.get("event", "?").removeprefix("checkpoint_")
    parts = [f"step {e['step']}" if e.get("step") is not None else what]
    if "tier" in e:
        parts.append(f"from the {e['tier']}")
    if "uri" in e:
        parts.append(f"at {e['uri']}")
    if isinstance(e.get("seconds"), int | float):
        parts.append(f"in {e['seconds']:.2f} s")
    parts.append(f"({when}, {e.get('node', '?')} rank {e.get('rank', '?')})")
    if "error" in e:
        parts.append(f"{what}: {e['error']}")
    return " ".join(parts)


@job.command()
@click.argument("name")
@_backend_options
@_output_option
def describe(
    name: str,
    where: _Where,
    output: str,
) -> None:
    """Show a job's state, nodes, restart history and its last incidents' timelines."""
    d = Job(name=name, backend=where.backend()).describe()
    if output == "json":
        _json(d.to_dict())
    else:
        _print_description(d)


@job.command()
@click.argument("name")
@click.option("-F", "--follow", is_flag=True, help="Keep printing until the job ends.")
@click.option("--node", help="Only this node (node-1 or 1; a pod name on Kubernetes).")
@click.option("--rank", type=int, help="Only this rank (the local rank where the global one is not known).")
@_backend_options
@_output_option
def logs(
    name: str,
    follow: bool,
    node: str | None,
    rank: int | None,
    where: _Where,
    output: str,
) -> None:
    """Print a job's output, every line prefixed by its node and rank."""
    j = Job(name=name, backend=where.backend())
    for line in j.logs(follow=follow, node=node, rank=rank):
        if output == "json":
            click.echo(
                json.dumps(
                    {"node": line.node, "rank": line.rank, "local_rank": line.local_rank, "text": line.text}
                )
            )
        else:
            click.echo(line.render())


@job.command()
@click.argument("name")
@_backend_options
@_output_option
def events(
    name: str,
    where: _Where,
    output: str,
) -> None:
    """Print a job's recovery events (local: the agents' timelines; Kubernetes: API events)."""
    b = where.backend()
    evs = Job(name=name, backend=b).events()
    if output == "json":
        _json(evs)
        return
    if b.name == "local":
        from stalwart.agent.timeline import format_incidents, summarize

        click.echo(format_incidents(summarize(evs)))
        return
    for e in evs:
        click.echo(f"{e.get('time')}  {e.get('object')}  {e.get('reason')}: {e.get('message')}")


@job.command()
@click.argument("name")
@_backend_options
@_output_option
def delete(
    name: str,
    where: _Where,
    output: str,
) -> None:
    """Stop a job's nodes and delete it with its state and logs."""
    Job(name=name, backend=where.backend()).delete()
    if output == "json":
        _json({"deleted": name})
    else:
        click.echo(f"job {name!r} deleted")
