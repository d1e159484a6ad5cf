"""What a worker gets: its environment (torchrun's contract plus ours) and how scripts run."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from torch.distributed.elastic.agent.server.api import WorkerGroup
from torch.distributed.elastic.utils import macros

from stalwart.agent.api import AgentConfig, ScriptFailed
from stalwart.agent.procs import LaunchSpec
from stalwart.worker import api as wapi

__all__ = ["error_file", "launch_spec", "run_script"]


def error_file(cfg: AgentConfig, generation: int, global_rank: int) -> str:
    """Where the worker of ``global_rank`` writes torch's error JSON (``@record``)."""
    return os.path.join(cfg.log_dir, cfg.node, f"gen-{generation}", f"error-{global_rank}.json")


def launch_spec(
    cfg: AgentConfig, wg: WorkerGroup, local_rank: int, generation: int, report_socket: str
) -> LaunchSpec:
    """The spec of local worker ``local_rank`` of ``generation``: torchrun's variables and ours."""
    w = wg.workers[local_rank]
    err = error_file(cfg, generation, w.global_rank)
    env = dict(cfg.worker_env)
    env.update(
        {
            "LOCAL_RANK": str(local_rank),
            "RANK": str(w.global_rank),
            "GROUP_RANK": str(wg.group_rank),
            "ROLE_RANK": str(w.role_rank),
            "ROLE_NAME": wg.spec.role,
            "LOCAL_WORLD_SIZE": str(wg.spec.local_world_size),
            "WORLD_SIZE": str(w.world_size),
            "GROUP_WORLD_SIZE": str(wg.group_world_size),
            "ROLE_WORLD_SIZE": str(w.role_world_size),
            "MASTER_ADDR": str(wg.master_addr),
            "MASTER_PORT": str(wg.master_port),
            # Every generation has a fresh store, hosted by the agent of group rank 0: workers
            # connect to it as clients and can never read a previous generation's keys.
            "TORCHELASTIC_USE_AGENT_STORE": str(True),
            "TORCHELASTIC_RESTART_COUNT": str(generation),
            "TORCHELASTIC_MAX_RESTARTS": str(cfg.max_restarts),
            "TORCHELASTIC_RUN_ID": cfg.run_id,
            "TORCHELASTIC_ERROR_FILE": err,
            wapi.ENV_GENERATION: str(generation),
            wapi.ENV_REPORT_SOCKET: report_socket,
            wapi.ENV_STACK_DIR: os.path.join(cfg.log_dir, "stacks"),
            wapi.ENV_FAULT_MARKER_DIR: os.path.join(cfg.log_dir, "faults"),
        }
    )
    os.makedirs(env[wapi.ENV_STACK_DIR], exist_ok=True)
    os.makedirs(os.path.dirname(err), exist_ok=True)
    if os.path.exists(err):
        os.unlink(err)
    return LaunchSpec(
        entrypoint=cfg.entrypoint,
        args=tuple(macros.substitute(list(cfg.args), str(local_rank))),
        env=env,
        cwd=cfg.cwd,
        module=cfg.module,
        no_python=cfg.no_python,
    )


def run_script(cfg: AgentConfig, what: str, argv: Sequence[str], generation: int) -> None:
    """Run a pre/post-train script with the workers' base env; raises ``ScriptFailed`` on failure."""
    env = dict(cfg.worker_env)
    env[wapi.ENV_GENERATION] = str(max(generation, 0))
    try:
        rc = subprocess.run(list(argv), env=env, cwd=cfg.cwd, stdin=subprocess.DEVNULL).returncode
    except OSError as exc:
        raise ScriptFailed(f"{what} script {argv[0]!r} could not start: {exc}; check the command") from exc
    if rc != 0:
        raise ScriptFailed(f"{what} script {' '.join(argv)!r} exited with {rc}; fix it or drop the flag")
