"""``stalwart run`` flags: torchrun's parser plus ours, resolved once into an ``AgentConfig``.

Every torchrun flag (and its ``PET_*`` environment variable) works as in torchrun. Resolution
order for our knobs: explicit flag > environment > default, all in ``build_config``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence

from torch.distributed.elastic.multiprocessing import Std
from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config, parse_rendezvous_endpoint
from torch.distributed.run import (
    determine_local_world_size,
    get_args_parser,
    get_rdzv_endpoint,
    get_use_env,
    parse_min_max_nnodes,
)

from stalwart.agent.api import AgentConfig
from stalwart.agent.policy import ladder_from_names
from stalwart.agent.rendezvous import auto_poll_interval
from stalwart.errors import ConfigError
from stalwart.health.config import add_health_arguments, build_monitors
from stalwart.worker.api import ENV_FAULT
from stalwart.worker.faults import parse_faults

__all__ = ["build_config", "build_parser", "parse"]

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def build_parser() -> argparse.ArgumentParser:
    """torchrun's argument parser with the ``stalwart`` and ``stalwart health`` groups added."""
    parser = get_args_parser()
    parser.prog = "stalwart run"
    parser.description = "Run a training script on this node: a drop-in for torchrun that restarts reliably."
    g = parser.add_argument_group("stalwart")
    g.add_argument(
        "--fault",
        metavar="SPEC",
        default=None,
        help="Inject a fault into the workers (sets STALWART_FAULT), e.g. crash:rank=1:step=20.",
    )
    g.add_argument(
        "--no-standby",
        action="store_true",
        help="Start a fresh interpreter for each worker instead of promoting warm standbys.",
    )
    g.add_argument(
        "--standby-preload",
        metavar="MOD[,MOD]",
        default="",
        help="Modules the standby workers import ahead of time (torch is always imported).",
    )
    g.add_argument(
        "--status-port",
        type=int,
        default=None,
        metavar="PORT",
        help="Port of the /status and /metrics endpoint (default: a free port; 0: off).",
    )
    g.add_argument(
        "--log-events",
        action="store_true",
        help="Also print each recovery event on the output as '[stalwart NODE] event {json}' "
        "(for pods, whose log directory is gone with them; 'stalwart job describe' reads these).",
    )
    g.add_argument(
        "--status-host",
        default="127.0.0.1",
        metavar="HOST",
        help="Address of the status endpoint (default 127.0.0.1; bind elsewhere only on purpose).",
    )
    g.add_argument(
        "--pre-train-script",
        default=None,
        metavar="CMD",
        help="Command (split like a shell) run before the workers start, on every (re)start.",
    )
    g.add_argument(
        "--post-train-script",
        default=None,
        metavar="CMD",
        help="Command (split like a shell) run once after the workers succeed.",
    )
    g.add_argument(
        "--user-error-threshold",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="A worker dying this soon after start, before its first report, twice with the "
        "same error, is a user error: stop at once (default 60).",
    )
    g.add_argument(
        "--restart-ladder",
        default="startup_retry,restart_workers,exit",
        metavar="RUNG[,RUNG]",
        help="The restart ladder's rungs, in order: startup_retry (one free retry of a start-up "
        "death, to tell a user error from a flake), restart_workers (restart every node's workers, "
        "spending the job-wide budget), exit (always last: hand the pod to the orchestrator). "
        "Default: all three.",
    )
    g.add_argument(
        "--rdzv-poll-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Seconds between polls of the c10d/etcd-v2 rendezvous state while waiting for peers "
        "(torch polls every 1 s). Default: 2 ms per node of --nnodes' maximum, 0.05 to 1 s.",
    )
    g.add_argument(
        "--restart-grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="Seconds between SIGTERM and SIGKILL when stopping workers for a restart.",
    )
    g.add_argument(
        "--node-name",
        default=None,
        metavar="NAME",
        help="Name of this node in logs and events files (default: HOSTNAME-PID).",
    )
    add_health_arguments(parser)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; argparse prints usage and exits 2 on bad flags."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        _validate(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return args


def _validate(args: argparse.Namespace) -> None:
    if args.fault:
        parse_faults(args.fault)
    if args.status_port is not None and not 0 <= args.status_port < 65536:
        raise ConfigError(f"--status-port {args.status_port}: use 0 (off) or a port from 1 to 65535")
    try:
        ladder_from_names(args.restart_ladder.split(","))
    except ValueError as exc:
        raise ConfigError(f"--restart-ladder {args.restart_ladder!r}: {exc}") from exc
    if args.rdzv_poll_interval is not None and not 0 < args.rdzv_poll_interval <= 60:
        raise ConfigError(f"--rdzv-poll-interval {args.rdzv_poll_interval}: use a value in (0, 60] seconds")
    if args.user_error_threshold <= 0:
        raise ConfigError("--user-error-threshold must be > 0 seconds")
    if args.restart_grace < 0:
        raise ConfigError("--restart-grace must be >= 0 seconds")
    _signals(args.signals_to_handle)
    if args.node_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.node_name):
        raise ConfigError(
            f"--node-name {args.node_name!r}: use letters, digits, '.', '_' and '-' (it names log files)"
        )
    for mod in filter(None, args.standby_preload.split(",")):
        if not all(part.isidentifier() for part in mod.split(".")):
            raise ConfigError(
                f"--standby-preload: {mod!r} is not a module name; pass e.g. numpy,transformers"
            )
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: must be >= 0")
    if args.monitor_interval <= 0:
        raise ConfigError(f"--monitor-interval {args.monitor_interval}: must be > 0")
    try:
        lo, hi = parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--nnodes {args.nnodes!r}: use N or MIN:MAX") from exc
    if not 0 < lo <= hi:
        raise ConfigError(f"--nnodes {args.nnodes!r}: need 0 < MIN <= MAX")
    if args.module and args.no_python:
        raise ConfigError("use either --module or --no-python, not both")
    for flag in ("pre_train_script", "post_train_script"):
        value = getattr(args, flag)
        if value is not None:
            try:
                parts = shlex.split(value)
            except ValueError as exc:
                raise ConfigError(f"--{flag.replace('_', '-')} {value!r}: {exc}") from exc
            if not parts:
                raise ConfigError(f"--{flag.replace('_', '-')} is empty")


def _resolve_rendezvous(args: argparse.Namespace) -> None:
    # As torchrun: --standalone, or a single node without an endpoint, uses a local c10d store.
    # We bind it to 127.0.0.1 rather than localhost.
    _, max_nodes = parse_min_max_nnodes(args.nnodes)
    if args.standalone or (
        args.rdzv_backend == "static"
        and not args.rdzv_endpoint
        and args.master_port is None
        and max_nodes == 1
    ):
        args.rdzv_backend = "c10d"
        args.rdzv_endpoint = "127.0.0.1:0"
        args.rdzv_id = str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500


def _signals(text: str) -> tuple[int, ...]:
    out = []
    for name in filter(None, (p.strip().upper() for p in text.split(","))):
        try:
            out.append(int(signal.Signals[name if name.startswith("SIG") else "SIG" + name]))
        except KeyError as exc:
            raise ConfigError(f"--signals-to-handle: unknown signal {name!r}; e.g. SIGTERM,SIGINT") from exc
        if out[-1] in _UNHANDLED_SIGNALS:
            raise ConfigError(
                f"--signals-to-handle: {signal.Signals(out[-1]).name} {_UNHANDLED_SIGNALS[out[-1]]}; "
                "leave it out (e.g. SIGTERM,SIGINT,SIGUSR1)"
            )
    return tuple(out)


_UNHANDLED_SIGNALS = {
    signal.SIGKILL: "cannot be caught",
    signal.SIGSTOP: "cannot be caught",
    signal.SIGCHLD: "comes at every worker's exit: handled as a stop signal, it would end the job",
    **{
        s: "reports a crash of the agent itself: handled, the crash would loop in the handler"
        for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)
    },
}


def _worker_host(args: argparse.Namespace, endpoint: str) -> str:
    if args.local_addr:
        return str(args.local_addr)
    host = parse_rendezvous_endpoint(endpoint, default_port=0)[0] if endpoint else ""
    if host in _LOOPBACK or host.startswith("127."):
        return "127.0.0.1"
    return socket.getfqdn()


# torchrun flags stalwart parses (so torchrun command lines run) but does not act on, and their
# torchrun defaults: given anything else, they are named on stderr rather than dropped unseen
UNSUPPORTED_FLAGS = {
    "virtual_local_rank": ("--virtual-local-rank", False),
    "numa_binding": ("--numa-binding", None),
    "duplicate_stdout_filters": ("--duplicate-stdout-filters", []),
    "duplicate_stderr_filters": ("--duplicate-stderr-filters", []),
    "logs_specs": ("--logs-specs", None),
    "event_log_handler": ("--event-log-handler", "null"),
    "start_method": ("--start-method", "spawn"),
}


def unsupported_flags(args: argparse.Namespace) -> list[str]:
    """The torchrun flags in ``args`` that stalwart ignores, given other than torchrun's default."""
    return [
        flag
        for dest, (flag, default) in UNSUPPORTED_FLAGS.items()
        if getattr(args, dest, default) not in (default, None)
    ]


def build_config(
    args: argparse.Namespace, environ: Mapping[str, str], worker_env: dict[str, str]
) -> AgentConfig:
    """Resolve parsed flags into the agent's config. ``worker_env`` is the workers' base env."""
    _resolve_rendezvous(args)
    for flag in unsupported_flags(args):
        print(
            f"stalwart run: {flag} is a torchrun flag stalwart does not support yet; it is ignored",
            file=sys.stderr,
            flush=True,
        )
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    try:
        nproc = determine_local_world_size(args.nproc_per_node)
    except ValueError as exc:
        raise ConfigError(f"--nproc-per-node {args.nproc_per_node!r}: {exc}") from exc
    if nproc > 1:
        worker_env.setdefault("OMP_NUM_THREADS", "1")
    rdzv_configs = _parse_rendezvous_config(args.rdzv_conf)
    if args.rdzv_backend == "static":
        rdzv_configs["rank"] = args.node_rank
    endpoint = get_rdzv_endpoint(args)
    ranks_filter = None
    if args.local_ranks_filter:
        try:
            ranks_filter = frozenset(int(x) for x in args.local_ranks_filter.split(","))
        except ValueError as exc:
            raise ConfigError(
                f"--local-ranks-filter {args.local_ranks_filter!r}: use comma-separated integers, e.g. 0,1"
            ) from exc
    if args.fault:
        worker_env[ENV_FAULT] = args.fault
    worker_env.setdefault("PYTHONUNBUFFERED", "1")
    cmd_args = list(args.training_script_args)
    if not get_use_env(args):
        cmd_args.insert(0, "--local-rank=${local_rank}")
    node = args.node_name or f"{socket.gethostname()}-{os.getpid()}"
    log_dir = args.log_dir or tempfile.mkdtemp(prefix=f"stalwart_{args.rdzv_id}_")
    os.makedirs(log_dir, exist_ok=True)
    status_port = 0 if args.status_port is None else (None if args.status_port == 0 else args.status_port)
    preload = tuple(m for m in args.standby_preload.split(",") if m)
    return AgentConfig(
        node=node,
        nproc_per_node=nproc,
        entrypoint=args.training_script,
        args=tuple(cmd_args),
        module=bool(args.module),
        no_python=bool(args.no_python),
        role=args.role,
        rdzv_backend=args.rdzv_backend,
        rdzv_endpoint=endpoint,
        run_id=args.rdzv_id,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        rdzv_poll_interval=(
            args.rdzv_poll_interval if args.rdzv_poll_interval is not None else auto_poll_interval(max_nodes)
        ),
        rdzv_configs=rdzv_configs,
        local_addr=args.local_addr,
        master_addr=args.master_addr,
        master_port=args.master_port,
        worker_host=_worker_host(args, endpoint),
        max_restarts=args.max_restarts,
        ladder=ladder_from_names(args.restart_ladder.split(",")),
        monitor_interval=args.monitor_interval,
        log_dir=os.path.abspath(log_dir),
        redirects=Std.from_str(args.redirects),
        tee=Std.from_str(args.tee),
        local_ranks_filter=ranks_filter,
        worker_env=worker_env,
        cwd=os.getcwd(),
        standby=0 if args.no_standby else nproc,
        standby_preload=preload,
        status_host=args.status_host,
        status_port=status_port,
        log_events=args.log_events,
        pre_train=shlex.split(args.pre_train_script) if args.pre_train_script else None,
        post_train=shlex.split(args.post_train_script) if args.post_train_script else None,
        startup_window=args.user_error_threshold,
        shutdown_timeout=float(
            args.shutdown_timeout
            if args.shutdown_timeout is not None
            else environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30)
        ),
        signals=_signals(args.signals_to_handle),
        restart_grace=args.restart_grace,
        monitors=build_monitors(args),
    )


def python_executable(environ: Mapping[str, str]) -> str:
    """The interpreter for workers: ``PYTHON_EXEC`` as in torchrun, else this one."""
    return environ.get("PYTHON_EXEC", sys.executable)
