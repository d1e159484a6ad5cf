"""Sharded tensors: which piece a rank saves, and which saved pieces fill a rank's shard on load.

Every saved piece records its global offsets and shape, so a checkpoint written by N ranks loads
into M ranks by box intersection (the idea behind DCP's planner, without its pickled metadata).
Replicated copies are written once: a DTensor piece is saved by the rank whose mesh coordinate is
0 along every replicated mesh dimension; a plain tensor is saved by rank 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from stalwart.checkpoint.api import ChunkEntry, TensorEntry
from stalwart.errors import CheckpointError

__all__ = ["Box", "Read", "local_box", "plan_reads", "saves_piece"]


@dataclass(frozen=True, slots=True)
class Box:
    """A rank's region of a global tensor."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Read:
    """Copy ``src`` (slices of a saved chunk) into ``dst`` (slices of the target's local tensor)."""

    chunk: ChunkEntry
    src: tuple[slice, ...]
    dst: tuple[slice, ...]
    whole: bool  # the chunk is exactly the target: read into it, with no temporary


def _dtensor(value: torch.Tensor) -> Any:
    """``value`` as a DTensor, or None. DTensor's module is slow to import: a state can only hold
    DTensors once the script imported it, so it is looked up, never imported here."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return value if cls is not None and isinstance(value, cls) else None


def local_box(value: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], Box]:
    """The local tensor, the global shape and this rank's box of ``value``."""
    dt = _dtensor(value)
    if dt is not None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if any(p.is_partial() for p in dt.placements):
            raise CheckpointError(
                "a DTensor with a Partial placement cannot be checkpointed; reduce it first"
            )
        shape, offsets = compute_local_shape_and_global_offset(
            value.shape, value.device_mesh, value.placements
        )
        return value.to_local(), tuple(value.shape), Box(tuple(offsets), tuple(shape))
    shape = tuple(value.shape)
    return value, shape, Box((0,) * len(shape), shape)


def saves_piece(value: torch.Tensor, rank: int) -> bool:
    """Whether this rank writes its piece of ``value`` (replicated copies are written once)."""
    dt = _dtensor(value)
    if dt is None:
        return rank == 0
    coord = dt.device_mesh.get_coordinate()
    if coord is None:
        return False
    # only Replicate dimensions hold copies: FSDP2 + TP shards with _StridedShard, for which
    # is_shard() is False, and those ranks hold distinct rows that must all be written
    return all(c == 0 for c, p in zip(coord, dt.placements, strict=True) if p.is_replicate())


def plan_reads(entry: TensorEntry, box: Box) -> list[Read]:
    """The saved pieces that overlap ``box`` and how to copy them; raises if they do not cover it."""
    if list(box.shape) != entry.global_shape and len(box.shape) != len(entry.global_shape):
        raise CheckpointError(
            f"tensor {'/'.join(entry.path)} has shape {entry.global_shape} in the checkpoint "
            f"but the target's global shape has {len(box.shape)} dimensions"
        )
    reads: list[Read] = []
    covered = 0
    for chunk in entry.chunks:
        src: list[slice] = []
        dst: list[slice] = []
        empty = False
        for c_off, c_len, t_off, t_len in zip(
            chunk.offsets, chunk.shape, box.offsets, box.shape, strict=True
        ):
            lo, hi = max(c_off, t_off), min(c_off + c_len, t_off + t_len)
            if hi <= lo:
                empty = True
                break
            src.append(slice(lo - c_off, hi - c_off))
            dst.append(slice(lo - t_off, hi - t_off))
        if empty:
            continue
        whole = tuple(chunk.offsets) == box.offsets and tuple(chunk.shape) == box.shape
        reads.append(Read(chunk, tuple(src), tuple(dst), whole))
        volume = 1
        for s in dst:
            volume *= s.stop - s.start
        covered += volume
    target = 1
    for n in box.shape:
        target *= n
    if covered < target:
        raise CheckpointError(
            f"tensor {'/'.join(entry.path)}: the saved pieces cover {covered} of the {target} elements this "
            "rank needs; the checkpoint was saved with a different sharding that leaves gaps"
        )
    return reads
