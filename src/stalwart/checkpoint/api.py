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

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ORIGIN_NAME",
    "RANK_STATE_KEY",
    "CheckedRead",
    "CheckpointRef",
    "ChunkEntry",
    "FileEntry",
    "Manifest",
    "PartRecord",
    "Storage",
    "TensorEntry",
    "cancel_and_wait",
    "parse_step_dir",
    "part_name",
    "shard_name",
    "step_dir",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A random id at the root of a checkpoint location, written by its first save: a memory-tier
# snapshot records it and is loaded only while the location still holds it (not once the
# location was emptied or replaced, when the snapshot belongs to a run that is gone)
ORIGIN_NAME = "stalwart-origin"
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


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{where}: field {key!r} has the wrong type {type(value).__name__}")
    return value


def _ints(d: Any, key: str, where: str) -> list[int]:
    values = _get(d, key, list, where)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: field {key!r} must be a list of integers")
    return values


def _record_crc(body: dict[str, Any]) -> int:
    """crc32c of a record's canonical JSON (sorted keys, no spaces): what its ``checksum`` holds."""
    from crc32c import crc32c  # ICRAR's: records are small, and every crc32c gives the same value

    return int(crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()))


class _Record:
    """JSON in and out for the frozen dataclasses below (no pickle, no code on load).

    A written record carries ``checksum``, the crc32c of the rest of it, so that a changed byte
    in a manifest or part record (a data-loader offset, a tensor's offsets) is found on load like
    one in a shard. Records written without one (before it existed) load unchecked.
    """

    def to_json(self) -> bytes:
        body = dataclasses.asdict(self)  # type: ignore[call-overload]
        body["checksum"] = _record_crc(body)
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Any:
        """Parse, check and validate; raises ``ValueError`` naming the bad field."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if isinstance(data, dict) and "checksum" in data:
            expected = data.pop("checksum")
            if expected != _record_crc(data):
                raise ValueError("fails its checksum: it was changed or damaged after it was written")
        return cls.from_dict(data)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ChunkEntry(_Record):
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

    @classmethod
    def from_dict(cls, d: Any) -> ChunkEntry:
        w = "chunk"
        return cls(
            _get(d, "file", str, w),
            _get(d, "start", int, w),
            _get(d, "nbytes", int, w),
            _ints(d, "offsets", w),
            _ints(d, "shape", w),
            _ints(d, "crcs", w),
        )


@dataclass(frozen=True, slots=True)
class TensorEntry(_Record):
    """A tensor of the state: its path in the nested dict and where its pieces were saved."""

    path: list[str]
    dtype: str
    global_shape: list[int]
    chunks: list[ChunkEntry]
    rank: int | None = None
    """The saving rank, for per-rank state (under ``RANK_STATE_KEY``); None when global."""

    @classmethod
    def from_dict(cls, d: Any) -> TensorEntry:
        w = "tensor"
        path = _get(d, "path", list, w)
        if not all(isinstance(p, str) for p in path):
            raise ValueError("tensor: path must be a list of strings")
        rank = d.get("rank") if isinstance(d, dict) else None
        if rank is not None and not isinstance(rank, int):
            raise ValueError("tensor: rank must be an integer or null")
        chunks = [ChunkEntry.from_dict(c) for c in _get(d, "chunks", list, w)]
        return cls(path, _get(d, "dtype", str, w), _ints(d, "global_shape", w), chunks, rank)


@dataclass(frozen=True, slots=True)
class FileEntry(_Record):
    """One shard file: its size and a checksum over its header and every piece's crcs."""

    size: int
    crc32c: int
    header_bytes: int

    @classmethod
    def from_dict(cls, d: Any) -> FileEntry:
        w = "file"
        return cls(_get(d, "size", int, w), _get(d, "crc32c", int, w), _get(d, "header_bytes", int, w))


def _values(d: Any, key: str, where: str) -> dict[str, Any]:
    return dict(_get(d, key, dict, where)) if isinstance(d, dict) and key in d else {}


@dataclass(frozen=True, slots=True)
class PartRecord(_Record):
    """What one rank wrote for one save attempt; rank 0 merges these into the manifest."""

    step: int
    rank: int
    world_size: int
    attempt: str
    file: FileEntry | None = None
    file_name: str | None = None
    tensors: list[TensorEntry] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    """Non-tensor leaves, keyed by their path joined with ``/``."""
    version: int = FORMAT_VERSION
    error: str | None = None
    """Set when this rank's save failed: rank 0 gives the commit up at once instead of waiting."""
    origin: str | None = None
    """Memory tier: the ``ORIGIN_NAME`` id of the durable location the snapshot was saved for."""

    @classmethod
    def from_dict(cls, d: Any) -> PartRecord:
        w = "part record"
        file = d.get("file") if isinstance(d, dict) else None
        name = d.get("file_name") if isinstance(d, dict) else None
        if name is not None and not isinstance(name, str):
            raise ValueError("part record: file_name must be a string or null")
        return cls(
            _get(d, "step", int, w),
            _get(d, "rank", int, w),
            _get(d, "world_size", int, w),
            _get(d, "attempt", str, w),
            FileEntry.from_dict(file) if file is not None else None,
            name,
            [TensorEntry.from_dict(t) for t in _get(d, "tensors", list, w)],
            _values(d, "values", w),
            _get(d, "version", int, w),
            str(d["error"]) if d.get("error") is not None else None,
            str(d["origin"]) if d.get("origin") is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Manifest(_Record):
    """The commit record of a checkpoint. Its presence makes the checkpoint complete."""

    step: int
    world_size: int
    attempt: str
    created_at: float
    files: dict[str, FileEntry]
    tensors: list[TensorEntry]
    values: list[dict[str, Any]]
    """Non-tensor leaves of each rank, indexed by rank."""
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        w = "manifest"
        version = _get(d, "version", int, w)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"manifest: format version {version} is newer than this stalwart ({FORMAT_VERSION})"
            )
        files = {str(k): FileEntry.from_dict(v) for k, v in _get(d, "files", dict, w).items()}
        values = _get(d, "values", list, w)
        if not all(isinstance(v, dict) for v in values):
            raise ValueError("manifest: values must be a list of objects")
        return cls(
            _get(d, "step", int, w),
            _get(d, "world_size", int, w),
            _get(d, "attempt", str, w),
            float(_get(d, "created_at", (int, float), w)),
            files,
            [TensorEntry.from_dict(t) for t in _get(d, "tensors", list, w)],
            values,
            version,
        )


class CheckedRead(NamedTuple):
    """One read of a storage's optional ``read_checked_many(reads) -> Iterator[list[int]]``: fill
    ``buf`` from ``offset`` of ``path``; its checksums are ``crc_slices(buf)``, the first slice's
    extending ``seed`` (None: the previous read's last checksum, for a slice read in several
    blocks). ``buf`` is written only while the iterator computes this read's checksums, so the
    caller may still be using it until it asks for them. ``direct=False``: other processes on the
    node read these bytes too (keep them in the page cache). ``PosixStorage`` has it; the loader
    reads through it where present."""

    path: str
    offset: int
    buf: np.ndarray
    seed: int | None = 0
    direct: bool = True


@runtime_checkable
class Storage(Protocol):
    """Where checkpoint files live. Paths are ``/``-separated strings relative to ``uri``.

    Implementations: ``PosixStorage`` (local disk, FSx for Lustre, /dev/shm) and ``S3Storage``.
    Every implementation runs ``tests/checkpoint/contract.py``.
    """

    uri: str

    def write(self, path: str, buffers: Sequence[memoryview]) -> None:
        """Write the concatenation of ``buffers`` to ``path``; durable when this returns.

        An implementation may also take ``ready: Callable[[int], None]`` (keyword): called before
        it reads the bytes up to a file offset, blocking until the caller has filled them. The
        ``Checkpointer`` then starts writing while the snapshot is still copying."""
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


def cancel_and_wait(jobs: Iterable[Future[Any]]) -> None:
    """Cancel the jobs not started yet and wait for the others, ignoring their errors: after a
    failure, none still writes into a buffer or uses a descriptor its caller is about to reuse,
    close or delete."""
    jobs = list(jobs)
    for job in jobs:
        job.cancel()
    for job in jobs:
        with contextlib.suppress(BaseException):
            job.result()
