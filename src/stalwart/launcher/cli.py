"""``stalwart run``: parse torchrun's flags and ours, build the node's agent, run it.

Exit codes are those of ``stalwart.agent.policy`` (0 ok, 1 failed, 2 usage, 3 user error,
4 script failed, 75 replace node, 76 restart budget spent, 128+N signal).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import click

__all__ = ["main", "run"]


@click.command(
    name="run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def run(argv: tuple[str, ...]) -> None:
    """Run a training script: a drop-in for torchrun (see ``stalwart run --help``)."""
    sys.exit(main(argv))


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run this node's agent as (possibly) PID 1; returns the exit code."""
    # Imports are here so that `stalwart --help` and `stalwart job` do not import torch.
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    from stalwart.agent import policy
    from stalwart.agent.agent import StalwartAgent, rendezvous_exit
    from stalwart.agent.rendezvous import set_poll_interval, tune_handler
    from stalwart.health.stacks import flight_recorder_env
    from stalwart.launcher.args import build_config, parse
    from stalwart.launcher.netenv import configure_network_env
    from stalwart.launcher.pid1 import run_as_init

    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "WARNING").upper(),
        format="[stalwart %(levelname)s %(name)s] %(message)s",
    )
    args = parse(argv)
    worker_env = dict(os.environ)
    effective = configure_network_env(worker_env)
    config = build_config(args, os.environ, worker_env)
    # NCCL flight-recorder dump files/pipe under the log dir, so the hang monitor can ask for a dump.
    # The buffer size is netenv's (it knows the variable's name for this torch version).
    for key, value in flight_recorder_env(config.log_dir).items():
        if "BUFFER_SIZE" not in key:
            worker_env.setdefault(key, value)
    if effective:
        shown = " ".join(f"{k}={v}" for k, v in sorted(effective.items()))
        print(f"[stalwart {config.node}] network env: {shown}", file=sys.stderr, flush=True)
    print(f"[stalwart {config.node}] log dir: {config.log_dir}", file=sys.stderr, flush=True)
    # Workers get a fresh store per generation from us; the rendezvous store stays the agents' own.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"

    def agent_main() -> int:
        set_poll_interval(config.rdzv_poll_interval)
        params = RendezvousParameters(
            backend=config.rdzv_backend,
            endpoint=config.rdzv_endpoint,
            run_id=config.run_id,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            local_addr=config.local_addr,
            **config.rdzv_configs,
        )
        try:
            handler = rdzv_registry.get_rendezvous_handler(params)
            tune_handler(handler, config.rdzv_poll_interval)
        except (RendezvousError, ValueError) as exc:
            print(
                f"stalwart: error: cannot reach the {config.rdzv_backend} rendezvous at "
                f"{config.rdzv_endpoint!r}: {exc}",
                file=sys.stderr,
            )
            # a store still starting (its pod pulling the image) is worth another pod, not the job
            return rendezvous_exit(exc)[0] if isinstance(exc, RendezvousError) else policy.EXIT_FAILED
        static = config.rdzv_backend == "static"
        spec = WorkerSpec(
            role=config.role,
            local_world_size=config.nproc_per_node,
            rdzv_handler=handler,
            entrypoint=config.entrypoint,
            args=config.args,
            max_restarts=config.max_restarts,
            monitor_interval=config.monitor_interval,
            master_addr=config.master_addr if static else None,
            master_port=config.master_port if static else None,
            local_addr=config.local_addr,
        )
        return StalwartAgent(config, spec).execute()

    return run_as_init(agent_main, signals=config.signals)
