"""stalwart: keeps large PyTorch training jobs running through faults.

Packages, in dependency order (each imports only those to its right):

- ``stalwart.job``: the job spec, CLI and SDK (local and Kubernetes backends).
- ``stalwart.launcher``: ``stalwart run``, the torchrun drop-in and container entrypoint.
- ``stalwart.agent``: the per-node agent, its restart ladder and recovery timeline.
- ``stalwart.health``, ``stalwart.checkpoint``, ``stalwart.worker``: monitors, checkpoints,
  and the in-worker API (``report``, fault injection).
"""

__version__ = "0.1.0"
