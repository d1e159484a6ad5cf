"""The checkpoint contract: references, the manifest model and the Storage protocol.

A checkpoint is a directory ``step-<N>/`` holding one safetensors file per writing rank
(``rank-<R>.safetensors``), one small part record per rank (``rank-<R>.json``, written after the
rank's data is durable) and ``manifest.json``. The manifest is written last, atomically, by rank 0
once every part record of the same save attempt exists: a checkpoint is complete exactly when its
manifest exists. No file in a checkpoint is ever unpickled: tensors are raw bytes described by a
JSON header, every other value is JSON.

This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "RANK_STATE_KEY",
    "CheckpointRef",
    "ChunkEntry",
    "FileEntry",
    "Manifest",
    "PartRecord",
    "Storage",
    "TensorEntry",
    "parse_step_dir",
    "part_name",
    "shard_name",
    "step_dir",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Values under this top-level key are saved by every rank and reloaded by the same rank; every
# other plain tensor is treated as replicated and written once, by rank 0.
RANK_STATE_KEY = "rank_state"

_STEP_DIR = re.compile(r"^step-(\d{9,})$")


def step_dir(step: int) -> str:
    """The directory name of ``step``: zero-padded so names sort like steps."""
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """The step a directory name holds, or None for any other name."""
    match = _STEP_DIR.match(name.rstrip("/"))
    return int(match.group(1)) if match else None


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def part_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    """One checkpoint found in a tier: like torch's ``RunResult`` for storage, a plain record.

    ``committed`` is False for a step directory without a manifest (a save in progress or a
    crashed attempt).
    """

    step: int
    uri: str
    tier: str
    committed: bool


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkEntry(_Model):
    """One saved piece of a tensor: where it sits in the global tensor and in which file."""

    file: str
    """Shard file name inside the step directory."""
    start: int
    """Byte offset of the piece's first byte inside the file."""
    nbytes: int
    offsets: list[int]
    """Global offsets of the piece along each dimension (all zero for an unsharded tensor)."""
    shape: list[int]
    """Local shape of the piece."""
    crcs: list[int]
    """crc32c of each ``CHUNK_BYTES`` slice of the piece, in order."""


class TensorEntry(_Model):
    """A tensor of the state: its path in the nested dict and where its pieces were saved."""

    path: list[str]
    dtype: str
    global_shape: list[int]
    chunks: list[ChunkEntry]
    rank: int | None = None
    """The saving rank, for per-rank state (under ``RANK_STATE_KEY``); None when global."""


class FileEntry(_Model):
    """One shard file: its size and a checksum over its header and every piece's crcs."""

    size: int
    crc32c: int
    header_bytes: int


class PartRecord(_Model):
    """What one rank wrote for one save attempt; rank 0 merges these into the manifest."""

    version: int = FORMAT_VERSION
    step: int
    rank: int
    world_size: int
    attempt: str
    file: FileEntry | None = None
    file_name: str | None = None
    tensors: list[TensorEntry] = Field(default_factory=list)
    values: dict[str, Any] = Field(default_factory=dict)
    """Non-tensor leaves, keyed by their path joined with ``/``."""


class Manifest(_Model):
    """The commit record of a checkpoint. Its presence makes the checkpoint complete."""

    version: int = FORMAT_VERSION
    step: int
    world_size: int
    attempt: str
    created_at: float
    files: dict[str, FileEntry]
    tensors: list[TensorEntry]
    values: list[dict[str, Any]]
    """Non-tensor leaves of each rank, indexed by rank."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


@runtime_checkable
class Storage(Protocol):
    """Where checkpoint files live. Paths are ``/``-separated strings relative to ``uri``.

    Implementations: ``PosixStorage`` (local disk, FSx for Lustre, /dev/shm) and ``S3Storage``.
    Every implementation runs ``tests/checkpoint/contract.py``.
    """

    uri: str

    def write(self, path: str, buffers: Sequence[memoryview]) -> None:
        """Write the concatenation of ``buffers`` to ``path``; durable when this returns."""
        ...

    def write_atomic(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        """Publish a small object all at once, never torn. ``exclusive`` fails if it exists."""
        ...

    def read(self, path: str) -> bytes:
        """The whole content of a small object."""
        ...

    def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each buffer with the bytes starting at its file offset, in parallel."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (directories end with ``/``)."""
        ...

    def exists(self, path: str) -> bool: ...

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` and everything under it; a missing prefix is not an error."""
        ...
