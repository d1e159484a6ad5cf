"""Rank 0's commit: wait for every rank's part record of one save attempt, merge, publish.

Parts are found by polling the storage (no collective runs in the background thread, so a save
can never deadlock against the training loop's collectives). The manifest is published with a
create-only write: an existing manifest for the step is never replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from stalwart.checkpoint.api import (
    MANIFEST_NAME,
    ChunkEntry,
    Manifest,
    PartRecord,
    Storage,
    TensorEntry,
    part_name,
    step_dir,
)
from stalwart.checkpoint.format import Piece, dtype_to_code, file_entry
from stalwart.errors import CheckpointError

__all__ = ["commit_step", "merge_parts", "part_record", "wait_for_parts"]

logger = logging.getLogger(__name__)


def part_record(
    step: int,
    rank: int,
    world_size: int,
    attempt: str,
    file_name: str,
    header: bytes,
    pieces: list[Piece],
    crcs: dict[int, list[int]],
    values: dict[str, Any],
) -> PartRecord:
    """The record of one file holding ``pieces`` after ``header`` (a memory slot or a durable shard);
    ``crcs`` maps ``id(piece)`` to the piece's slice checksums."""
    tensors = [
        TensorEntry(
            path=list(p.path),
            dtype=dtype_to_code(p.tensor.dtype),
            global_shape=list(p.global_shape),
            rank=p.rank,
            chunks=[
                ChunkEntry(
                    file=file_name,
                    start=len(header) + p.start,
                    nbytes=p.nbytes,
                    offsets=list(p.offsets),
                    shape=list(p.tensor.shape),
                    crcs=crcs[id(p)],
                )
            ],
        )
        for p in pieces
    ]
    entry = file_entry(header, pieces, [crcs[id(p)] for p in pieces]) if pieces else None
    return PartRecord(
        step=step,
        rank=rank,
        world_size=world_size,
        attempt=attempt,
        file=entry,
        file_name=file_name if pieces else None,
        tensors=tensors,
        values=values,
    )


def wait_for_parts(
    storage: Storage,
    step: int,
    world_size: int,
    attempt: str,
    timeout_s: float,
    stop: threading.Event,
    own: PartRecord | None = None,
) -> list[PartRecord]:
    """Every rank's part record of ``attempt``, in rank order; raises when ``timeout_s`` runs out.
    ``own`` is the caller's part, already in hand (it is never written to the storage)."""
    directory = step_dir(step)
    deadline = time.monotonic() + timeout_s
    parts: dict[int, PartRecord] = {} if own is None else {own.rank: own}
    delay = 0.005
    while True:
        for rank in range(world_size):
            if rank in parts:
                continue
            try:
                record = PartRecord.from_json(storage.read(f"{directory}/{part_name(rank)}"))
            except (FileNotFoundError, ValueError):
                continue  # not written yet, or a stale record of a crashed attempt being replaced
            if record.attempt == attempt:
                if record.error is not None:
                    raise CheckpointError(f"step {step}: rank {rank} could not save its part: {record.error}")
                parts[rank] = record
        if len(parts) == world_size:
            return [parts[r] for r in range(world_size)]
        if time.monotonic() > deadline or stop.is_set():
            missing = sorted(set(range(world_size)) - set(parts))
            raise CheckpointError(
                f"step {step}: ranks {missing} did not finish writing within {timeout_s:.0f} s"
            )
        stop.wait(delay)
        delay = min(delay * 2, 0.5)


def merge_parts(step: int, attempt: str, parts: list[PartRecord]) -> Manifest:
    """One manifest from the ranks' parts: a tensor's pieces from every rank become its chunks."""
    merged: dict[tuple[tuple[str, ...], int | None], TensorEntry] = {}
    files = {}
    for record in parts:
        if record.file is not None and record.file_name is not None:
            files[record.file_name] = record.file
        for t in record.tensors:
            key = (tuple(t.path), t.rank)
            if key in merged:
                merged[key] = dataclasses.replace(merged[key], chunks=merged[key].chunks + t.chunks)
            else:
                merged[key] = t
    return Manifest(
        step=step,
        world_size=len(parts),
        attempt=attempt,
        created_at=time.time(),
        files=files,
        tensors=list(merged.values()),
        values=[p.values for p in parts],
    )


def commit_step(storage: Storage, manifest: Manifest) -> None:
    """Publish ``manifest`` last and create-only: from here on the step is a checkpoint."""
    try:
        storage.write_atomic(f"{step_dir(manifest.step)}/{MANIFEST_NAME}", manifest.to_json(), exclusive=True)
    except FileExistsError:
        logger.warning(
            "checkpoint step %d was committed by another save meanwhile; keeping that one", manifest.step
        )
