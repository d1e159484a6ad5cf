"""``stalwart job init``: a commented ``job.yaml`` that validates as written."""

from __future__ import annotations

from pathlib import Path

from stalwart.errors import JobError

__all__ = ["JOB_YAML", "write_job_yaml"]

JOB_YAML = """\
# A stalwart job. Check it with `stalwart job validate`, run it with `stalwart job create`.
# Any field can be overridden on the command line: --set nodes=4 --set env.NCCL_DEBUG=INFO
apiVersion: stalwart.dev/v1
kind: Job
name: {name}                   # lower-case letters, digits and '-', at most 40 characters

# Where it runs: "local" (this machine, N simulated nodes) or "kubernetes".
backend: local

# The container image (kubernetes only); it must have stalwart installed (see docker/).
image: null                    # e.g. 123456789012.dkr.ecr.us-west-2.amazonaws.com/stalwart:0.1.0

# What every worker runs: `stalwart run ... SCRIPT ARGS`. Arguments never pass through a shell.
script: examples/train.py
args: ["--steps", "200"]

nodes: "1"                     # a count, or MIN:MAX for an elastic job ("2:4")
nproc_per_node: 2              # workers per node; at most resources.gpus when GPUs are requested
spares: 0                      # extra standby nodes (HyperPod replicaSpecs[].spares)

resources:                     # per node
  gpus: 0
  efa: 0                       # EFA devices (vpc.amazonaws.com/efa)
  cpu: null                    # e.g. "90"
  memory: null                 # e.g. 1000Gi
  shm: 8Gi                     # size of /dev/shm (null: do not mount one)

volumes: []
#  - name: fsx                  # FSx for Lustre through its PersistentVolumeClaim
#    mount_path: /fsx
#    pvc: fsx-claim
#  - name: data
#    mount_path: /data
#    host_path: /mnt/data
#    read_only: true

env: {{}}                       # e.g. {{NCCL_DEBUG: INFO}}

checkpoint:
  uri: null                    # a path, file://, s3://bucket/prefix, or a path on an FSx mount
  mirrors: []                  # further tiers with a copy of every checkpoint, e.g. [s3://bucket/run]

restart:
  max_restarts: 3              # the job-wide restart budget
  ladder: [startup_retry, restart_workers, exit]   # rungs tried in order (in_process: reserved)

health:
  hang_timeout_s: null         # seconds without progress from any rank before it counts as a hang
  log_rules: []
#  - name: heartbeat
#    log_pattern: ".*loss.*"
#    expected_start_cutoff_s: 240
#    expected_recurring_frequency_s: 600
#  - name: throughput
#    log_pattern: ".*TFLOPs: (\\\\d+).*"
#    metric_threshold: 100
#    operator: lt               # gt, lt, eq, gteq, lteq
#  - name: cuda-error
#    log_pattern: ".*CUDA error.*"
#    fault_on_match: true

scheduling:                    # kubernetes only
  queue: null                  # Kueue LocalQueue
  priority: null               # Kueue WorkloadPriorityClass
  node_selector: {{}}
  instance_type: null          # e.g. ml.p5.48xlarge
  topology:
    preferred: null            # e.g. topology.k8s.aws/network-node-layer-3
    required: null
  scheduler_name: null
  service_account: null

kubernetes:
  flavour: jobset              # hyperpod | pytorchjob | jobset | batch (indexed Job + Service)
  namespace: default
  image_pull_policy: null

rendezvous:
  port: 29400
  store: pod                   # kubernetes: pod (a store pod of its own) | first-node (torchrun's way)
  endpoint: null               # HOST:PORT of a store you run; replaces both

fault: null                    # testing only: inject a fault, e.g. crash:rank=1:step=20
"""


def write_job_yaml(directory: str | Path, name: str = "my-job", force: bool = False) -> Path:
    """Write ``DIR/job.yaml``; refuses to overwrite an existing file unless ``force``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "job.yaml"
    if path.exists() and not force:
        raise JobError(f"{path} already exists; pass --force to overwrite it")
    path.write_text(JOB_YAML.format(name=name))
    return path
