"""The ``stalwart run`` command line every node of a job runs, local or in a pod.

Flags are torchrun's spelling (``stalwart run`` is a drop-in), so the same argv also runs under
plain torchrun: the local backend's hidden ``STALWART_JOB_LAUNCHER=torchrun`` setting does that.
Arguments are always an argv list; nothing here goes through a shell.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from stalwart.job.spec import JobSpec, LogRule
from stalwart.worker.api import ENV_CHECKPOINT_MIRRORS, ENV_CHECKPOINT_URI

__all__ = [
    "ENV_LAUNCHER",
    "hyperpod_rule",
    "job_env",
    "launcher_argv",
    "plain_torchrun",
    "run_args",
]

_STORE_CONNECT_S = 300

ENV_LAUNCHER = "STALWART_JOB_LAUNCHER"
"""Hidden setting for the local backend: ``torchrun`` runs nodes under plain torchrun."""


def plain_torchrun() -> bool:
    """True when the hidden setting asks the local backend for plain torchrun."""
    return os.environ.get(ENV_LAUNCHER) == "torchrun"


def launcher_argv() -> list[str]:
    """The argv prefix that starts one local node: ``stalwart run`` in this interpreter."""
    if plain_torchrun():
        return [sys.executable, "-m", "torch.distributed.run"]
    return [sys.executable, "-m", "stalwart.cli", "run"]


def hyperpod_rule(rule: LogRule, integer_threshold: bool = False) -> dict[str, Any]:
    """A log rule in HyperPod's camelCase ``logMonitoringConfiguration`` form."""
    out: dict[str, Any] = {"name": rule.name, "logPattern": rule.log_pattern}
    if rule.expected_start_cutoff_s is not None:
        out["expectedStartCutOffInSeconds"] = rule.expected_start_cutoff_s
    if rule.expected_recurring_frequency_s is not None:
        out["expectedRecurringFrequencyInSeconds"] = rule.expected_recurring_frequency_s
    if rule.stop_pattern is not None:
        out["stopPattern"] = rule.stop_pattern
    if rule.metric_threshold is not None:
        t = rule.metric_threshold
        out["metricThreshold"] = int(t) if integer_threshold or t == int(t) else t
        out["operator"] = rule.operator
    if rule.metric_evaluation_data_points is not None:
        out["metricEvaluationDataPoints"] = rule.metric_evaluation_data_points
    if rule.fault_on_match:
        out["faultOnMatch"] = True
    return out


def _stalwart_flags(spec: JobSpec, node_name: str | None) -> list[str]:
    """Flags only ``stalwart run`` has (restart ladder, health rules, node name)."""
    flags: list[str] = ["--restart-ladder", ",".join(spec.restart.ladder)]
    if node_name:
        flags += ["--node-name", node_name]
    hang = spec.health.hang_timeout_s
    if hang is not None:
        flags += ["--hang-floor", f"{hang:g}", "--hang-startup-timeout", f"{hang:g}"]
    for rule in spec.health.log_rules:
        flags += ["--log-rule", json.dumps(hyperpod_rule(rule), separators=(",", ":"))]
    return flags


def run_args(
    spec: JobSpec,
    *,
    endpoint: str,
    nnodes: str | None = None,
    is_host: bool | None = None,
    local_addr: str | None = None,
    log_dir: str | None = None,
    node_name: str | None = None,
    torchrun: bool = False,
    log_events: bool = False,
) -> list[str]:
    """The flags after ``stalwart run``, then the script and its arguments.

    ``torchrun=True`` leaves out the flags plain torchrun does not know (health, node name).
    ``log_events=True`` makes the agents print their recovery events (pods: the log directory
    goes with the pod, the output stays readable through the API).
    """
    args = [
        "--nnodes",
        nnodes or str(spec.nodes),
        "--nproc-per-node",
        str(spec.nproc_per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        spec.name,
        "--max-restarts",
        str(spec.restart.max_restarts),
        "--tee",
        "3",
    ]
    conf = [f"join_timeout={spec.rendezvous.join_timeout_s}"]
    if is_host is not None:
        conf.append(f"is_host={int(is_host)}")
    if is_host is False:
        # a client waits this long for the store to listen (torch: 60 s), as long as a pod of
        # its own may take to pull the image and start
        conf.append(f"read_timeout={_STORE_CONNECT_S}")
    args += ["--rdzv-conf", ",".join(conf)]
    if local_addr:
        args += ["--local-addr", local_addr]
    if log_dir:
        args += ["--log-dir", log_dir]
    if not torchrun:
        args += _stalwart_flags(spec, node_name)
        if log_events:
            args.append("--log-events")
    return [*args, spec.script, *spec.args]


def job_env(spec: JobSpec) -> dict[str, str]:
    """Environment for every node: the user's ``env`` plus what stalwart derives from the spec.

    The checkpoint URI and mirrors travel as ``STALWART_CHECKPOINT_URI`` and
    ``STALWART_CHECKPOINT_MIRRORS`` (``Checkpointer.from_env`` reads them); the user's own ``env``
    wins on a clash.
    """
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1", "STALWART_JOB": spec.name}
    if spec.checkpoint.uri:
        env[ENV_CHECKPOINT_URI] = spec.checkpoint.uri
    if spec.checkpoint.mirrors:
        env[ENV_CHECKPOINT_MIRRORS] = ",".join(spec.checkpoint.mirrors)
    if spec.fault:
        env["STALWART_FAULT"] = spec.fault
    env.update(spec.env)
    return env
