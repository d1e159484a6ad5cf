"""Loading one checkpoint into a state in place, verifying every byte it reads.

Pieces that match a CPU target exactly are read into the target tensor's memory with no
per-tensor deserialisation: on POSIX by ``O_DIRECT`` reads through a small bounce buffer per load
stream (see ``storage_posix``), on S3 by ranged GETs straight into it. Pieces that match a device target (a
GPU) stream through two small host buffers per load stream, pinned on CUDA, so each buffer's copy
to the device runs while the next one is read and host memory stays bounded. Others (resharding,
non-contiguous tensors) go through a temporary buffer and a copy. A missing file, a short file or
a checksum mismatch raises ``CheckpointCorrupt`` (the caller falls back to an older checkpoint);
a state that does not match the checkpoint raises ``CheckpointError``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stalwart.checkpoint.api import (
    CheckedRead,
    ChunkEntry,
    FileEntry,
    Manifest,
    PartRecord,
    Storage,
    TensorEntry,
    step_dir,
)
from stalwart.checkpoint.format import (
    CHUNK_BYTES,
    CONTAINERS_KEY,
    SliceCrcs,
    as_bytes,
    crc_slices,
    crc_slices_copy,
    decode_key,
    dtype_from_code,
    dtype_to_code,
    file_digest,
    flatten,
)
from stalwart.checkpoint.reshard import Box, local_box, plan_reads
from stalwart.errors import CheckpointCorrupt, CheckpointError

__all__ = ["Source", "load_into", "verify_source"]

# 1 GiB cold from the local disk here, direct reads: 4 streams 0.87-0.90 of the read ceiling,
# 8 streams 0.85-0.86 (paired A/B runs)
_LOAD_STREAMS = 4
# each load stream's two staging buffers for device targets (2 x 4 x 16 MiB = 128 MiB in all)
_STAGE_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class _Staged:
    """A piece bound for a device tensor: read through staging buffers into ``target``."""

    target: torch.Tensor  # the target's bytes, flat (uint8)

    @property
    def size(self) -> int:
        return self.target.numel()


def _direct(local: torch.Tensor) -> bool:
    """Whether reads can land straight in ``local``'s memory (a CPU tensor)."""
    return local.device.type == "cpu"


@dataclass(frozen=True, slots=True)
class Source:
    """One checkpoint to load: where its files are and what they hold."""

    tier: str
    step: int
    storage: Storage
    prefix: str
    world_size: int
    files: dict[str, FileEntry]
    tensors: list[TensorEntry]
    values: list[dict[str, Any]]  # per saving rank
    owner: int | None = None  # memory tier: the only rank whose values are present
    mapped: dict[str, torch.Tensor] | None = None  # memory tier: each file mapped as uint8
    verify: bool = True  # memory tier only: False skips the checksums

    @classmethod
    def from_manifest(cls, tier: str, storage: Storage, manifest: Manifest) -> Source:
        return cls(
            tier,
            manifest.step,
            storage,
            step_dir(manifest.step) + "/",
            manifest.world_size,
            manifest.files,
            manifest.tensors,
            manifest.values,
        ).checked()

    def checked(self) -> Source:
        """This source, once its record is found to describe files it could have written:
        ``CheckpointCorrupt`` (a fallback to an older checkpoint) for sizes, offsets, shapes or
        checksum lists that disagree. A checksummed record can only disagree if it was written
        that way or forged; an older record without a checksum, if it was damaged."""
        where = f"checkpoint step {self.step} ({self.tier})"

        def bad(what: str) -> CheckpointCorrupt:
            return CheckpointCorrupt(f"{where} has a damaged record: {what}")

        for name, f in self.files.items():
            if not 0 <= f.header_bytes <= f.size:
                raise bad(f"file {name} has a {f.header_bytes}-byte header in {f.size} bytes")
        for t in self.tensors:
            label = "/".join(t.path)
            itemsize = dtype_from_code(t.dtype).itemsize
            if any(n < 0 for n in t.global_shape):
                raise bad(f"tensor {label} has the shape {t.global_shape}")
            volume = 0
            for c in t.chunks:
                dims = zip(c.offsets, c.shape, t.global_shape, strict=False)
                if (
                    len(c.offsets) != len(t.global_shape)
                    or len(c.shape) != len(t.global_shape)
                    or any(o < 0 or n < 0 or o + n > g for o, n, g in dims)
                ):
                    raise bad(
                        f"a piece of tensor {label} at {c.offsets} {c.shape} is outside {t.global_shape}"
                    )
                if c.nbytes != math.prod(c.shape) * itemsize or len(c.crcs) != max(
                    1, -(-c.nbytes // CHUNK_BYTES)
                ):
                    raise bad(f"a piece of tensor {label} has {c.nbytes} bytes and {len(c.crcs)} checksums")
                f = self.files.get(c.file)
                if f is None:
                    raise bad(f"tensor {label} is in {c.file}, which it does not list")
                if c.nbytes and not f.header_bytes <= c.start <= f.size - c.nbytes:
                    raise bad(f"a piece of tensor {label} at byte {c.start} is outside {c.file}")
                volume += math.prod(c.shape)
            if self.owner is None and volume != math.prod(t.global_shape):  # a part: one rank's pieces
                raise bad(
                    f"the pieces of tensor {label} hold {volume} of its {math.prod(t.global_shape)} elements"
                )
        return self

    @classmethod
    def from_part(
        cls,
        tier: str,
        storage: Storage,
        part: PartRecord,
        mapped: dict[str, torch.Tensor] | None = None,
        verify: bool = True,
    ) -> Source:
        files = {part.file_name: part.file} if part.file and part.file_name else {}
        values = [part.values]
        return cls(
            tier,
            part.step,
            storage,
            "",
            part.world_size,
            files,
            part.tensors,
            values,
            part.rank,
            mapped,
            verify,
        ).checked()

    def where(self, file: str) -> str:
        return f"{self.storage.uri.rstrip('/')}/{self.prefix}{file}"

    def values_of(self, rank: int) -> dict[str, Any]:
        if self.owner is not None:
            return self.values[0]
        return self.values[rank % len(self.values)] if self.values else {}


def _source_rank(rank: int, world_size: int) -> int:
    return rank if rank < world_size else rank % world_size


def load_into(
    source: Source,
    state: dict[str, Any],
    rank: int,
    readers: int = 1,
    created: set[int] | None = None,
) -> None:
    """Fill ``state`` in place from ``source``; see the module docstring for the errors.

    ``readers``: the processes on this node loading the same checkpoint (the local world size).
    With more than one, every rank reads the whole of each replicated piece, and those reads go
    through the page cache, so the node reads them from storage once; direct reads would fetch
    them once per rank. ``created``: the ids of the dicts loads into ``state`` made for missing
    paths (share one set across the attempts of one load: a failed attempt leaves its dicts)."""
    created = set() if created is None else created
    src_rank = _source_rank(rank, source.world_size)
    by_path: dict[tuple[str, ...], TensorEntry] = {}
    for entry in source.tensors:
        if entry.rank is None or entry.rank == src_rank:
            by_path[tuple(entry.path)] = entry
    shared = {
        id(entry.chunks[0])
        for entry in by_path.values()
        if readers > 1 and entry.rank is None and len(entry.chunks) == 1
    }
    values = source.values_of(src_rank)

    checks: list[tuple[str, ChunkEntry, np.ndarray | _Staged]] = []
    copies: list[tuple[torch.Tensor, tuple[slice, ...], torch.Tensor, tuple[slice, ...]]] = []
    setters: list[tuple[Any, Any, Any]] = []
    seen: set[tuple[str, ...]] = set()
    mapped_jobs: list[tuple[TensorEntry, torch.Tensor, Box]] = []

    seen_values: set[str] = {CONTAINERS_KEY}
    for leaf in flatten(state):
        if not isinstance(leaf.value, torch.Tensor):
            key = "/".join(leaf.path)
            seen_values.add(key)
            if key in values:
                restored = values[key]
                if isinstance(leaf.value, tuple) and isinstance(restored, list):
                    restored = tuple(restored)
                setters.append((leaf.container, leaf.key, restored))
            continue
        seen.add(leaf.path)
        entry = by_path.get(leaf.path)
        if entry is None:
            raise CheckpointError(
                f"checkpoint step {source.step} ({source.tier}) has no tensor {'/'.join(leaf.path)!r}; "
                "load into a state with the same keys it was saved with"
            )
        local, global_shape, box = local_box(leaf.value)
        if dtype_to_code(local.dtype) != entry.dtype or list(global_shape) != entry.global_shape:
            raise CheckpointError(
                f"tensor {'/'.join(leaf.path)!r} is {entry.dtype}{entry.global_shape} in checkpoint step "
                f"{source.step} but {dtype_to_code(local.dtype)}{list(global_shape)} in the state being loaded"
            )
        if source.mapped is not None:
            mapped_jobs.append((entry, local, box))
        else:
            _plan_tensor(entry, local, box, checks, copies)

    for path, entry in by_path.items():
        if path not in seen and len(entry.chunks) == 1 and entry.chunks[0].shape == entry.global_shape:
            fresh = torch.empty(entry.global_shape, dtype=dtype_from_code(entry.dtype))
            point = _insert_point(state, path, fresh, created)
            if point is None:
                continue
            whole = Box((0,) * len(entry.global_shape), tuple(entry.global_shape))
            if source.mapped is not None:
                mapped_jobs.append((entry, fresh, whole))
            else:
                _plan_tensor(entry, fresh, whole, checks, copies)
            setters.append(point)

    for key, value in values.items():
        if key not in seen_values:
            point = _insert_point(state, tuple(key.split("/")), value, created)
            if point is not None:
                setters.append(point)
    if source.mapped is not None:
        _copy_mapped(source, mapped_jobs)
    _read_and_verify(source, checks, shared)
    for dst, dst_slices, src, src_slices in copies:
        dst[dst_slices].copy_(src[src_slices])
    for container, key, value in setters:
        container[key] = value
    _restore_containers(state, values.get(CONTAINERS_KEY, {}), created)


def _plan_tensor(
    entry: TensorEntry,
    local: torch.Tensor,
    box: Box,
    checks: list[tuple[str, ChunkEntry, np.ndarray | _Staged]],
    copies: list[tuple[torch.Tensor, tuple[slice, ...], torch.Tensor, tuple[slice, ...]]],
) -> None:
    dtype = dtype_from_code(entry.dtype)
    for read in plan_reads(entry, box):
        chunk = read.chunk
        if read.whole and local.is_contiguous() and not _direct(local):
            checks.append((chunk.file, chunk, _Staged(local.detach().reshape(-1).view(torch.uint8))))
            continue
        if read.whole and local.is_contiguous():
            buf = as_bytes(local)
        else:
            tmp = torch.empty(chunk.shape, dtype=dtype)
            buf = as_bytes(tmp)
            copies.append((local, read.dst, tmp, read.src))
        checks.append((chunk.file, chunk, buf))


def _insert_point(
    state: dict[str, Any], path: tuple[str, ...], value: Any, created: set[int]
) -> tuple[Any, Any, Any] | None:
    """Where a value missing from ``state`` goes, creating the dicts on its path (their ids
    join ``created``); None where something else is in the way (the state has another shape
    there: it is left as it is)."""
    node: Any = state
    for part in path[:-1]:
        if isinstance(node, dict):
            key = decode_key(part)
            if key not in node:
                node[key] = {}
                created.add(id(node[key]))
            node = node[key]
        elif isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if isinstance(node, dict):
        return node, decode_key(path[-1]), value
    if isinstance(node, list) and path[-1].isdigit() and int(path[-1]) < len(node):
        return node, int(path[-1]), value
    return None


def _restore_containers(state: dict[str, Any], kinds: dict[str, str], created: set[int]) -> None:
    """Give a state loaded into the containers it was saved with (``flatten``'s ``shapes``): the
    empty dicts it lacks, and lists and tuples where loads made dicts. Containers the state
    already had stay as they are."""
    for path in sorted(kinds, key=lambda p: -p.count("/")):  # the innermost first
        parts, kind = tuple(path.split("/")), kinds[path]
        if kind == "dict":
            point = _insert_point(state, parts, None, created)
            if point is not None and isinstance(point[0], dict) and point[1] not in point[0]:
                point[0][point[1]] = {}
            continue
        parent = _walk(state, parts[:-1])
        if not isinstance(parent, dict):
            continue
        key = decode_key(parts[-1])
        node = parent.get(key)
        if not isinstance(node, dict) or id(node) not in created:
            continue
        if set(node) != {str(i) for i in range(len(node))}:
            continue  # not the list it was saved as: leave it
        items = [node[str(i)] for i in range(len(node))]
        parent[key] = tuple(items) if kind == "tuple" else items


def _walk(state: Any, parts: tuple[str, ...]) -> Any:
    """The container at ``parts`` in ``state``, or None."""
    node = state
    for part in parts:
        try:
            node = node[decode_key(part)] if isinstance(node, dict) else node[int(part)]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return node


def _read_and_verify(
    source: Source,
    checks: Sequence[tuple[str, ChunkEntry, np.ndarray | _Staged]],
    shared: set[int],
) -> None:
    """Read and verify every check's piece; those in ``shared`` (chunk ids) through the page
    cache, where the storage can tell."""
    for file in sorted({file for file, _, _ in checks}):
        _check_header(source, file)
    # _LOAD_STREAMS loaders, each reading one contiguous share of the bytes in file order; one's
    # checksums and copies overlap the others' reads
    todo = sorted((c for c in checks if c[2].size), key=lambda c: (c[0], c[1].start))
    total, seen = sum(c[2].size for c in todo), 0
    parts: list[list[tuple[str, ChunkEntry, np.ndarray | _Staged]]] = [[] for _ in range(_LOAD_STREAMS)]
    for check in todo:
        parts[min(seen * _LOAD_STREAMS // total, _LOAD_STREAMS - 1)].append(check)
        seen += check[2].size
    # the caller's current CUDA streams (current streams are per thread): the work queued there
    # on the targets runs before the loader's copies overwrite them
    callers = {
        into.target.device: torch.cuda.current_stream(into.target.device)
        for _, _, into in todo
        if isinstance(into, _Staged) and into.target.device.type == "cuda"
    }
    reading = getattr(source.storage, "reading", None)  # POSIX: reuse read buffers across reads
    with (
        reading() if reading is not None else contextlib.nullcontext(),
        ThreadPoolExecutor(_LOAD_STREAMS, thread_name_prefix="stalwart-load") as pool,
    ):
        jobs = [pool.submit(_read_chunks, source, part, callers, shared) for part in parts if part]
        for job in jobs:
            job.result()


def _read_chunks(
    source: Source,
    chunks: Sequence[tuple[str, ChunkEntry, np.ndarray | _Staged]],
    callers: dict[torch.device, Any],
    shared: set[int],
) -> None:
    plain = [(file, chunk, into) for file, chunk, into in chunks if not isinstance(into, _Staged)]
    _read_plain_chunks(source, plain, shared)
    staged: dict[torch.device, list[tuple[str, ChunkEntry, _Staged]]] = {}
    for file, chunk, into in chunks:
        if isinstance(into, _Staged):
            staged.setdefault(into.target.device, []).append((file, chunk, into))
    stagers: list[_Stager] = []
    try:
        for device, pieces in staged.items():
            stagers.append(_Stager(device, callers.get(device)))
            _read_staged_chunks(source, pieces, stagers[-1], shared)
    finally:
        for stager in stagers:
            stager.finish()


def _read_plain_chunks(
    source: Source, chunks: Sequence[tuple[str, ChunkEntry, np.ndarray]], shared: set[int]
) -> None:
    """Read and verify pieces into host buffers, in order; with one ``read_checked_many`` where
    the storage has it (POSIX: it reads the next piece while this one is checksummed)."""
    many = getattr(source.storage, "read_checked_many", None)
    if many is None:
        for file, chunk, into in chunks:
            _read_chunk(source, file, chunk, into, id(chunk) not in shared)
        return
    reads = [
        CheckedRead(source.prefix + file, chunk.start, into, 0, id(chunk) not in shared)
        for file, chunk, into in chunks
    ]
    done = 0
    with _read_errors(source, lambda: chunks[done][0]), contextlib.closing(many(reads)) as results:
        for crcs in results:
            file, chunk, _ = chunks[done]
            _check_crcs(source, file, chunk, crcs)
            done += 1


@contextlib.contextmanager
def _read_errors(source: Source, file: Callable[[], str]) -> Iterator[None]:
    """A failed read as ``CheckpointCorrupt`` naming the file being read (``file()``): the
    caller falls back to an older checkpoint."""
    try:
        yield
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{source.where(file())} is missing") from None
    except CheckpointCorrupt:
        raise
    except OSError as exc:
        raise CheckpointCorrupt(f"cannot read {source.where(file())}: {exc}") from None


class _Stager:
    """One load stream's two host buffers for a device, taking turns: one is read into while the
    other's copy to the device runs. On CUDA the buffers are pinned and the copies run on a stream
    of the stager's own; elsewhere a copy is a plain blocking one."""

    def __init__(self, device: torch.device, caller: Any = None) -> None:
        cuda = device.type == "cuda"
        self.buffers = [torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.copied: list[Any] = [None, None]  # each buffer's last copy, a CUDA event
        self.turn = 0
        self.stream: Any = None
        if cuda:
            self.stream = torch.cuda.Stream(device)
            # work already queued on the targets (their initialisation, say) runs first
            self.stream.wait_stream(caller if caller is not None else torch.cuda.current_stream(device))

    def take(self, n: int) -> np.ndarray:
        """The first ``n`` bytes of the buffer whose turn it is, once its last copy is done."""
        self.wait_turn()
        return self.buffers[self.turn][:n].numpy()

    def wait_turn(self) -> None:
        """Wait until the last copy out of the buffer whose turn it is is done."""
        copied = self.copied[self.turn]
        if copied is not None:
            copied.synchronize()

    def send(self, target: torch.Tensor) -> None:
        """Copy the taken buffer into ``target`` (flat bytes, as many as were taken); next turn."""
        source = self.buffers[self.turn][: target.numel()]
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                target.copy_(source, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.copied[self.turn] = event
        else:
            target.copy_(source)
        self.turn ^= 1

    def finish(self) -> None:
        """Wait for every copy sent (the buffers may be freed after this)."""
        if self.stream is not None:
            self.stream.synchronize()


def _read_staged_chunks(
    source: Source, chunks: Sequence[tuple[str, ChunkEntry, _Staged]], stager: _Stager, shared: set[int]
) -> None:
    """Read pieces through ``stager`` into their device targets, in order, each in blocks that
    fit a staging buffer and never straddle a checksum slice; with one ``read_checked_many``
    where the storage has it (POSIX: the next blocks' requests are in flight while one block is
    checksummed into a staging buffer and copied to the device)."""
    many = getattr(source.storage, "read_checked_many", None)
    if many is None:
        for file, chunk, into in chunks:
            _read_staged(source, file, chunk, into, stager, id(chunk) not in shared)
        return
    blocks: list[tuple[int, int, int]] = []  # (index in chunks, offset in the piece, bytes)
    reads: list[CheckedRead] = []
    for k, (file, chunk, _) in enumerate(chunks):
        done = 0
        while done < chunk.nbytes:
            n = min(_STAGE_BYTES, chunk.nbytes - done, CHUNK_BYTES - done % CHUNK_BYTES)
            buf = stager.buffers[(stager.turn + len(reads)) % 2][:n].numpy()
            seed = 0 if done % CHUNK_BYTES == 0 else None  # None: the slice's checksum goes on
            reads.append(
                CheckedRead(source.prefix + file, chunk.start + done, buf, seed, id(chunk) not in shared)
            )
            blocks.append((k, done, n))
            done += n
    i, slices = 0, []  # the block under way; its piece's slice checksums so far
    with _read_errors(source, lambda: chunks[blocks[i][0]][0]), contextlib.closing(many(reads)) as results:
        stager.wait_turn()  # the iterator writes a block into its buffer when asked for its checksums
        for (crc,) in results:
            k, start, n = blocks[i]
            file, chunk, into = chunks[k]
            stager.send(into.target[start : start + n])
            if (start + n) % CHUNK_BYTES == 0 or start + n == chunk.nbytes:
                slices.append(crc)
            if start + n == chunk.nbytes:
                _check_crcs(source, file, chunk, slices)  # after the copies, as a direct read's check
                slices = []
            i += 1
            stager.wait_turn()


def _read_staged(
    source: Source, file: str, chunk: ChunkEntry, into: _Staged, stager: _Stager, direct: bool = True
) -> None:
    """Read one piece through ``stager`` into its device target, checksumming as it reads; a
    mismatch raises after the copies, as a direct read does after reading into its target."""
    sums = SliceCrcs(chunk.nbytes)
    while sums.done < chunk.nbytes:
        done, n = sums.done, sums.next_block(_STAGE_BYTES)
        (crc,) = _read_range(source, file, chunk.start + done, stager.take(n), sums.crc, direct)
        stager.send(into.target[done : done + n])
        sums.advance(crc, n)
    _check_crcs(source, file, chunk, sums.crcs)


def _copy_mapped(source: Source, jobs: list[tuple[TensorEntry, torch.Tensor, Box]]) -> None:
    """Verify each piece in the mapping, then copy it straight into its target (CPU or device)."""
    assert source.mapped is not None
    for file, entry in source.files.items():
        mapping = source.mapped.get(file)
        if mapping is None or mapping.numel() != entry.size:
            raise CheckpointCorrupt(f"{source.where(file)} is missing or has the wrong size")
        if source.verify:
            _check_header(source, file)
    on_device = False

    def one(entry: TensorEntry, local: torch.Tensor, box: Box) -> None:
        nonlocal on_device
        dtype = dtype_from_code(entry.dtype)
        for read in plan_reads(entry, box):
            chunk = read.chunk
            raw = source.mapped[chunk.file][chunk.start : chunk.start + chunk.nbytes]  # type: ignore[index]
            fused = source.verify and read.whole and local.device.type == "cpu" and local.is_contiguous()
            if fused and chunk.nbytes:
                # checksum and copy in one pass; a mismatch raises as the durable path does after
                # reading into the target, and the caller falls back to an older checkpoint
                _check_crcs(source, chunk.file, chunk, crc_slices_copy(as_bytes(raw), as_bytes(local)))
                continue
            if source.verify and chunk.nbytes:
                _check_crcs(source, chunk.file, chunk, crc_slices(as_bytes(raw)))
            src = raw.view(dtype).view(chunk.shape) if chunk.nbytes else torch.empty(chunk.shape, dtype=dtype)
            on_device |= local.device.type != "cpu"
            with torch.no_grad():
                if read.whole:
                    local.copy_(src, non_blocking=True)
                else:
                    local[read.dst].copy_(src[read.src], non_blocking=True)

    with ThreadPoolExecutor(2, thread_name_prefix="stalwart-load") as pool:
        for job in [pool.submit(one, *j) for j in jobs]:
            job.result()
    if on_device:
        torch.cuda.synchronize()


def _read_range(
    source: Source, file: str, offset: int, buf: np.ndarray, seed: int = 0, direct: bool = True
) -> list[int]:
    """Fill ``buf`` from ``offset`` of ``file``: the checksum of each ``CHUNK_BYTES`` slice of it,
    the first one extending ``seed``. ``direct=False`` keeps a POSIX read in the page cache."""
    read_checked = getattr(source.storage, "read_checked", None)  # POSIX: checksum as it reads
    with _read_errors(source, lambda: file):
        if read_checked is not None:
            return list(read_checked(source.prefix + file, offset, buf, seed, direct=direct))
        source.storage.read_into(source.prefix + file, [(offset, memoryview(buf))])
    sums = SliceCrcs(buf.size, seed)
    while sums.done < buf.size:
        sums.extend(buf[sums.done : sums.done + sums.next_block(buf.size)])  # a slice at a time
    return sums.crcs


def _read_chunk(source: Source, file: str, chunk: ChunkEntry, buf: np.ndarray, direct: bool = True) -> None:
    _check_crcs(source, file, chunk, _read_range(source, file, chunk.start, buf, 0, direct))


def _check_crcs(source: Source, file: str, chunk: ChunkEntry, crcs: list[int]) -> None:
    """Raise ``CheckpointCorrupt`` naming the file and the bytes if ``crcs`` are not the piece's."""
    if crcs != chunk.crcs:
        raise CheckpointCorrupt(
            f"{source.where(file)} fails its checksum (bytes {chunk.start}+{chunk.nbytes})"
        )


def _check_header(source: Source, file: str) -> None:
    entry = source.files.get(file)
    if entry is None:
        raise CheckpointCorrupt(
            f"checkpoint step {source.step} lists no file {file}: its manifest is damaged"
        )
    header = np.empty(entry.header_bytes, dtype=np.uint8)
    try:
        source.storage.read_into(source.prefix + file, [(0, memoryview(header))])
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{source.where(file)} is missing") from None
    crcs = [c.crcs for _, c in _chunks_of(source, file)]
    if file_digest(header.tobytes(), crcs) != entry.crc32c:
        raise CheckpointCorrupt(f"{source.where(file)} fails its checksum (header)")


def _chunks_of(source: Source, file: str) -> list[tuple[TensorEntry, ChunkEntry]]:
    found = [(t, c) for t in source.tensors for c in t.chunks if c.file == file]
    # in file order; an empty piece shares its start with the next one and comes first (the
    # file digest follows the order the pieces were laid out in, whatever the record's order)
    return sorted(found, key=lambda tc: (tc[1].start, tc[1].nbytes))


def verify_source(source: Source) -> list[str]:
    """Read and check every file of ``source``; the problems found (empty when it is sound)."""
    problems: list[str] = []
    for file in sorted(source.files):
        try:
            _check_header(source, file)
            for _, chunk in _chunks_of(source, file):
                buf = np.empty(chunk.nbytes, dtype=np.uint8)
                if buf.size:
                    source.storage.read_into(source.prefix + file, [(chunk.start, memoryview(buf))])
                if buf.size:
                    _check_crcs(source, file, chunk, crc_slices(buf))
        except FileNotFoundError:
            problems.append(f"{source.where(file)} is missing")
        except (CheckpointCorrupt, OSError) as exc:
            problems.append(str(exc))
    return problems


def snapshot_values(values: dict[str, Any]) -> dict[str, Any]:
    """A JSON copy of the non-tensor leaves, taken now (training may mutate them while a save
    persists); raises a clear error for a value JSON cannot hold."""
    copied: dict[str, Any] = {}
    for key, value in values.items():
        try:
            copied[key] = json.loads(json.dumps(value, allow_nan=True))
        except (TypeError, ValueError):
            raise CheckpointError(
                f"state value {key!r} of type {type(value).__name__} is neither a tensor nor JSON-able; "
                "store it as a tensor, a number, a string, or a list/dict of those"
            ) from None
    return copied
