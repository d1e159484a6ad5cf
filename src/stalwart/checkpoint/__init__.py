"""stalwart.checkpoint: tiered, verified, asynchronous checkpoints (memory, POSIX/FSx, S3).

``Checkpointer(uri).save(step, state)`` snapshots into /dev/shm and persists in the background;
``load_latest(state)`` reloads the newest complete checkpoint in place, falling back past corrupt
ones. See ``api`` for the on-storage layout.
"""

from stalwart.checkpoint.api import RANK_STATE_KEY, CheckpointRef, Manifest, Storage
from stalwart.checkpoint.checkpointer import CheckpointConfig, Checkpointer, env_mirrors
from stalwart.checkpoint.retention import committed_steps
from stalwart.checkpoint.storage import open_storage

__all__ = [
    "RANK_STATE_KEY",
    "CheckpointConfig",
    "CheckpointRef",
    "Checkpointer",
    "Manifest",
    "Storage",
    "committed_steps",
    "env_mirrors",
    "open_storage",
]
