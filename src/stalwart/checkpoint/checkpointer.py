"""The public ``Checkpointer``: async save through the memory tier, commit, retention, load_latest.

A save runs in two phases (CheckFreq's snapshot/persist):

1. **snapshot**, in the training loop: one copy of every tensor into a reused staging buffer that
   is a /dev/shm mapping (the memory tier), pinned when CUDA is present.
2. **persist**, in background threads: the shard file, whose write follows the copy block by
   block for ``blocking=True`` (the save costs about max(copy, write), not the sum) and starts
   after it otherwise; checksums (computed by the copy itself for ``blocking=True``, after it
   otherwise); the memory-tier commit, the part record on the durable storage, and on rank 0 the
   manifest commit and retention.

A failed persist never stops training: it is logged as a warning and counted in
``stalwart_checkpoint_save_failures_total``. At most ``max_in_flight`` saves persist at once; the
next ``save`` waits for the oldest. Saves are flushed on SIGTERM and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import inspect
import logging
import math
import mmap
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stalwart.checkpoint.api import (
    MANIFEST_NAME,
    ORIGIN_NAME,
    RANK_STATE_KEY,
    CheckpointRef,
    Manifest,
    PartRecord,
    Storage,
    part_name,
    shard_name,
    step_dir,
)
from stalwart.checkpoint.commit import commit_step, merge_parts, part_record, wait_for_parts
from stalwart.checkpoint.format import (
    CONTAINERS_KEY,
    Layout,
    Piece,
    as_bytes,
    crc_slices,
    crc_slices_copy,
    flatten,
    plan_layout,
)
from stalwart.checkpoint.loader import Source, load_into, snapshot_values
from stalwart.checkpoint.memory import DEFAULT_SHM_ROOT, MemoryTier, pin, remove_job, unpin
from stalwart.checkpoint.metrics import CheckpointMetrics, checkpoint_metrics
from stalwart.checkpoint.reshard import local_box, saves_piece
from stalwart.checkpoint.retention import apply_retention, committed_steps
from stalwart.checkpoint.storage import open_storage
from stalwart.errors import CheckpointCorrupt, CheckpointError, ConfigError
from stalwart.worker import busy, event
from stalwart.worker.api import ENV_CHECKPOINT_MIRRORS, ENV_CHECKPOINT_URI

__all__ = ["CheckpointConfig", "Checkpointer", "env_mirrors"]

logger = logging.getLogger(__name__)

_OK, _CORRUPT, _FATAL = 0, 1, 2
_ORIGIN_WAIT_S = 10.0  # how long a rank waits for rank 0 to make the location's origin id


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """How a ``Checkpointer`` saves, keeps and finds checkpoints."""

    keep_last: int = 2
    """Committed checkpoints kept (at least 2, so a corrupt newest one has a fallback)."""
    keep_every: int = 0
    """Also keep every step divisible by this (0: none)."""
    max_in_flight: int = 1
    """Saves persisting at once; ``save`` blocks for the oldest beyond this."""
    memory_tier: bool = True
    """Keep the latest snapshot in /dev/shm so a restarted worker reloads at memory speed."""
    shm_root: str = DEFAULT_SHM_ROOT
    job: str | None = None
    """Names the memory tier's directory; default: a hash of the checkpoint URI."""
    io_threads: int = 2
    """Parallel read/write streams per file (S3: at least 8 parts in flight)."""
    commit_timeout_s: float = 600.0
    """How long rank 0 waits for every rank's part before giving the save up."""
    flush_on_sigterm: bool = True
    verify_memory: bool = True
    """Checksum memory-tier snapshots on load. Costs about one pass over the state (crc32c runs
    near memcpy speed); durable tiers are always verified."""
    rank_state_on_resize: str = "remap"
    """A checkpoint with ``rank_state`` loaded by another number of ranks: ``"remap"`` (rank R
    loads saved rank R % N's, with a warning: after a scale-up, ranks repeat others' data-loader
    positions) or ``"error"`` (refuse; per-rank state has no resharding path)."""

    def __post_init__(self) -> None:
        if self.keep_last < 2:
            raise ConfigError(
                f"keep_last={self.keep_last}: keep at least 2 checkpoints so a corrupt one has a fallback"
            )
        if self.keep_every < 0:
            raise ConfigError(f"keep_every={self.keep_every} must be 0 (off) or a positive step interval")
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight={self.max_in_flight} must be at least 1")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads={self.io_threads} must be at least 1")
        if self.rank_state_on_resize not in ("remap", "error"):
            raise ConfigError(
                f"rank_state_on_resize={self.rank_state_on_resize!r} must be 'remap' or 'error'"
            )


class Progress:
    """How far a snapshot has copied (bytes of the data section, in order), for the persist."""

    def __init__(self, *, fused: bool = True) -> None:
        self._cond = threading.Condition()
        self._done = 0
        self._error: BaseException | None = None
        self.crcs: dict[int, list[int]] = {}  # piece id -> slice crcs computed during the copy
        self.fused = fused  # the copy computes the checksums (else the persist does, after it)

    def advance(self, done: int) -> None:
        with self._cond:
            self._done = max(self._done, done)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def wait(self, upto: int) -> None:
        """Block until the first ``upto`` bytes are copied; raise if the copy failed."""
        with self._cond:
            while self._done < upto and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise CheckpointError(f"the snapshot failed: {self._error}") from self._error


@dataclass(frozen=True, slots=True)
class _SaveJob:
    """One save on its way from the staging buffer to storage (the background part of ``save``)."""

    step: int
    attempt: str
    slot: int
    layout: Layout
    buf: torch.Tensor  # the slot's staging buffer: header + data
    values: dict[str, Any]
    progress: Progress
    future: Future[CheckpointRef | None]  # resolved at the commit on the checkpoint URI
    started: float  # time.perf_counter() when save() was called
    rewrite: bool = False  # the step is committed but was skipped on load (damaged): write it again
    # this process saved or loaded the step before: a committed copy of it is this run's (else
    # an earlier run's, which is not overwritten)
    known: bool = True
    skipped: frozenset[int] = frozenset()  # the Checkpointer's skipped steps when save() was called

    @property
    def data(self) -> np.ndarray:
        """The data section of the staging buffer, as flat bytes (a view)."""
        return as_bytes(self.buf)[len(self.layout.header) :]

    def durable_shard(self) -> list[memoryview]:
        """The durable shard file's bytes: its header, then the durable pieces' data."""
        return [memoryview(self.layout.durable_header), memoryview(self.data[: self.layout.durable_bytes])]


class Checkpointer:
    """Saves and loads training state at ``uri`` (a path, ``file://`` or ``s3://``).

    Construct it on every rank at the same point (it agrees on a save token with one broadcast).
    ``state`` is a nested dict of tensors (plain or DTensor) and JSON-able values. Plain tensors
    are taken as replicated and written by rank 0; values under ``"rank_state"`` (RNG states, a
    data-loader position) are saved by each rank and reloaded by the same rank.

    ``distributed=False`` makes this process act alone (rank 0 of 1, no collectives): for a DDP
    script where rank 0 alone saves the replicated state. Load such checkpoints on every rank with
    a distributed ``Checkpointer`` so the ranks agree on the step.
    """

    def __init__(
        self,
        uri: str,
        config: CheckpointConfig | None = None,
        *,
        storage: Storage | None = None,
        process_group: dist.ProcessGroup | None = None,
        distributed: bool = True,
        registry: Any = None,
        mirrors: Sequence[str | Storage] = (),
        **s3_options: Any,
    ) -> None:
        self.config = config or CheckpointConfig()
        self.storage = storage or open_storage(uri, threads=self.config.io_threads, **s3_options)
        self.mirrors: list[Storage] = [
            open_storage(m, threads=self.config.io_threads, **s3_options) if isinstance(m, str) else m
            for m in mirrors
        ]
        uris = [self.storage.uri, *(m.uri for m in self.mirrors)]
        if len(set(uris)) != len(uris):
            raise ConfigError(
                f"checkpoint tiers {uris} repeat a location: each mirror must differ from the "
                "checkpoint URI and from the other mirrors"
            )
        self.uri = uri
        self._pg = process_group
        self._dist = distributed and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self._dist else 0
        self.world_size = dist.get_world_size(process_group) if self._dist else 1
        # the processes on this node that load alongside this one (set by torchrun and stalwart)
        self._node_readers = _env_int("LOCAL_WORLD_SIZE", 1) if self._dist else 1
        self._token = self._agree_token()
        self._check_shared()
        # storages whose write takes ``ready`` start writing while the snapshot is still copying
        self._pipelined = "ready" in inspect.signature(self.storage.write).parameters
        self._metrics: CheckpointMetrics = checkpoint_metrics(registry)
        self.job = self.config.job or hashlib.sha1(self.storage.uri.encode()).hexdigest()[:12]
        self._slots = self.config.max_in_flight + 1
        self.memory: MemoryTier | None = None
        if self.config.memory_tier:
            try:
                self.memory = MemoryTier(self.job, self.rank, self._slots, self.config.shm_root)
            except OSError as exc:
                logger.warning("memory tier disabled: cannot use %s (%s)", self.config.shm_root, exc)
        self._private: dict[int, torch.Tensor] = {}
        self._pending: deque[Future[CheckpointRef | None]] = deque()
        self._published: dict[int, str] = {}  # step -> attempt whose part this rank (not 0) handed over
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stalwart-ckpt")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="stalwart-ckpt-io")
        # retention runs after the commit, off the save's critical path (torchtitan's purge thread)
        self._purge = ThreadPoolExecutor(1, thread_name_prefix="stalwart-ckpt-purge")
        self._purges: deque[Future[None]] = deque()
        self._stop = threading.Event()
        # committed steps newer than the one load_latest loaded (skipped as damaged, or not on
        # every rank): retention leaves them until this run has saved past them, and a save of
        # one of them writes it again (replaced, never read or mutated in place: threads share it)
        self._skipped: frozenset[int] = frozenset()
        self._ours: frozenset[int] = frozenset()  # steps rank 0 committed in this process
        self._known: set[int] = set()  # steps this process saved or loaded (alike on every rank)
        self._seq = 0
        self._origin: str | None = None  # the durable location's ORIGIN_NAME id, once known
        self._origin_waited = False  # a rank other than 0 waits for rank 0's id once
        self._last_save_bytes = 0
        self._closed = False
        self.last_error: BaseException | None = None
        self._prev_sigterm: Any = None
        self._main_depth = 0  # main-thread save()/wait() calls under way (see _sigterm_deferred)
        self._term: tuple[int, Any] | None = None  # a SIGTERM that came during one of them
        atexit.register(self._at_exit)
        if self.config.flush_on_sigterm and threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    @classmethod
    def from_env(cls, config: CheckpointConfig | None = None, **kwargs: Any) -> Checkpointer:
        """The job's ``Checkpointer``: the URI and mirrors ``stalwart job`` gives workers from its
        spec's ``checkpoint`` section (``STALWART_CHECKPOINT_URI``, ``STALWART_CHECKPOINT_MIRRORS``).
        ``kwargs`` go to the constructor (``mirrors=`` there replaces the environment's)."""
        uri = os.environ.get(ENV_CHECKPOINT_URI, "")
        if not uri:
            raise ConfigError(
                f"{ENV_CHECKPOINT_URI} is not set: set checkpoint.uri in the job spec, or construct "
                "Checkpointer(uri) yourself"
            )
        kwargs.setdefault("mirrors", env_mirrors())
        return cls(uri, config, **kwargs)

    # -- collectives (main thread only) --------------------------------------------------------
    def _device(self) -> torch.device:
        if self._dist and "nccl" in str(dist.get_backend(self._pg)):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _reduce(self, value: int, op: dist.ReduceOp.RedOpType) -> int:
        if not self._dist:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=op, group=self._pg)
        return int(t.item())

    def _reduce_all(self, values: list[int], op: dist.ReduceOp.RedOpType) -> list[int]:
        if not self._dist:
            return values
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=op, group=self._pg)
        return [int(v) for v in t.tolist()]

    def _check_shared(self) -> None:
        """Every rank must see the files rank 0 writes at the URI and at each mirror: rank 0
        commits from the parts the ranks write there, so a node-local path in a multi-node job
        would fail every save (after ``commit_timeout_s``). Raises ``ConfigError`` naming it."""
        if not self._dist or self.world_size == 1:
            return
        tiers = [self.storage, *self.mirrors]
        probe = f".stalwart-probe-{self._token}"
        written = [0] * len(tiers)
        if self.rank == 0:
            for i, storage in enumerate(tiers):
                try:
                    storage.write_atomic(probe, b"written by rank 0 to check that every rank sees it\n")
                    written[i] = 1
                except Exception as exc:  # unwritable now: saves will report it, not construction
                    logger.warning("cannot check that every rank sees %s: %s", storage.uri, exc)
        written = self._reduce_all(written, dist.ReduceOp.MAX)  # also: rank 0 has written
        blind = [self.world_size] * len(tiers)  # per tier: the lowest rank that cannot see it
        why: dict[int, str] = {}
        for i, storage in enumerate(tiers):
            if self.rank == 0 or not written[i]:
                continue
            try:
                seen = _appears(storage, probe)
            except Exception as exc:  # raising here would leave the other ranks in the collective
                seen, why[i] = False, f" ({exc})"
            if not seen:
                blind[i] = self.rank
        blind = self._reduce_all(blind, dist.ReduceOp.MIN)
        if self.rank == 0:
            for storage, done in zip(tiers, written, strict=True):
                if done:
                    with contextlib.suppress(Exception):
                        storage.delete(probe)
        for i, (storage, rank) in enumerate(zip(tiers, blind, strict=True)):
            if rank < self.world_size:
                raise ConfigError(
                    f"checkpoint location {storage.uri} is not shared by all ranks: rank {rank} cannot "
                    f"see the file rank 0 wrote there{why.get(i, '')}. Rank 0 commits each checkpoint from the parts "
                    "every rank writes, so all ranks need the same storage: use a shared file system "
                    "(FSx for Lustre, NFS) or S3; the memory tier (on by default) already keeps a "
                    "node-local copy for fast restarts"
                )

    def _agree_token(self) -> str:
        t = torch.tensor([time.time_ns() ^ (os.getpid() << 20)], dtype=torch.int64)
        if self._dist:
            t = t.to(self._device())
            dist.broadcast(t, src=dist.get_global_rank(self._pg, 0) if self._pg else 0, group=self._pg)
        return f"{int(t.item()) & 0xFFFFFFFFFFFF:012x}"

    # -- save ---------------------------------------------------------------------------------
    def save(
        self, step: int, state: dict[str, Any], *, blocking: bool = False
    ) -> Future[CheckpointRef | None]:
        """Snapshot ``state`` now and persist it in the background (or before returning).

        Returns a future of the saved ``CheckpointRef``, or of None when persisting failed (the
        failure is logged and counted, never raised: training goes on). The future is done once
        the checkpoint is committed on the checkpoint URI; copies to ``mirrors`` follow in the
        background (a later ``save``, ``wait`` or ``close`` waits for them).
        """
        if self._closed:
            raise CheckpointError("save() called after close(): create a new Checkpointer")
        if step < 0:
            raise ConfigError(f"checkpoint step {step} must be non-negative")
        with self._sigterm_deferred():
            return self._save(step, state, blocking)

    def _save(self, step: int, state: dict[str, Any], blocking: bool) -> Future[CheckpointRef | None]:
        if len(self._pending) >= self.config.max_in_flight:
            busy(_persist_allowance(self._last_save_bytes))  # waiting for a save is not a hang
        while len(self._pending) >= self.config.max_in_flight:
            self._pending[0].result()  # still queued while it runs: a SIGTERM flush waits for it
            self._pending.popleft()
        while self._purges and self._purges[0].done():
            self._purges.popleft()
        started = time.perf_counter()
        pieces, values = self._collect(state)
        metadata = {"format": "stalwart", "step": str(step), "rank": str(self.rank)}
        layout = plan_layout(pieces, metadata)
        self._last_save_bytes = layout.file_bytes
        slot = self._seq % self._slots
        self._seq += 1
        attempt = f"{self._token}-{self._seq}"
        # on every rank alike, whatever becomes of this save; and once: a later save of a
        # rewritten step skips as usual
        rewrite, known = step in self._skipped, step in self._known
        self._skipped = self._skipped - {step}
        self._known.add(step)
        try:
            buf = self._buffer(slot, layout.file_bytes)
        except (RuntimeError, OSError, CheckpointError) as exc:  # out of memory, a full /dev/shm...
            failed: Future[CheckpointRef | None] = Future()
            failed.set_result(self._persist_failed(step, attempt, exc))
            return failed
        # A blocking save's shard write follows the copy (each block waits for its bytes), and
        # the copy checksums as it goes, one pass over memory: durable after about max(copy,
        # write), not the sum. An async save's copy runs alone, and the persist writes and
        # checksums after it (see _persist_or_raise; checksumming alongside doubled its blocking
        # time here).
        progress = Progress(fused=blocking)
        future: Future[CheckpointRef | None] = Future()
        save = _SaveJob(
            step, attempt, slot, layout, buf, values, progress, future, started, rewrite, known, self._skipped
        )
        self._pending.append(self._executor.submit(self._persist, save))
        try:
            self._snapshot(buf, layout, progress)
        except BaseException as exc:
            progress.fail(exc)  # the persist reports the failed save (and never waits forever)
            if not isinstance(exc, RuntimeError | OSError | CheckpointError):
                raise
        self._metrics.blocking_seconds.observe(time.perf_counter() - started)
        if blocking:
            busy(_persist_allowance(layout.file_bytes))
            future.result()
        return future

    def _snapshot(self, buf: torch.Tensor, layout: Layout, progress: Progress) -> None:
        """Copy every piece into the slot's staging buffer (the memory tier): the blocking part."""
        buf[: len(layout.header)].copy_(torch.frombuffer(bytearray(layout.header), dtype=torch.uint8))
        data = buf[len(layout.header) :]
        on_gpu = any(piece.tensor.device.type == "cuda" for piece in layout.pieces)
        for piece in layout.pieces:  # in data order
            src = piece.tensor.detach()
            dst_bytes = data[piece.start : piece.start + piece.nbytes]
            if progress.fused and _plain_cpu(src):
                # a blocking save checksums while it copies: each block is read from memory once,
                # which leaves more memory bandwidth to the shard write that streams alongside
                raw = src.reshape(-1).view(torch.uint8).numpy()
                progress.crcs[id(piece)] = crc_slices_copy(raw, dst_bytes.numpy())
                if not on_gpu:  # else an earlier GPU piece may still be in flight
                    progress.advance(piece.start + piece.nbytes)
                continue
            dst = dst_bytes.view(src.dtype).view(src.shape)
            dst.copy_(src, non_blocking=True)
            if not on_gpu:
                progress.advance(piece.start + piece.nbytes)
        if on_gpu:
            torch.cuda.synchronize()
        progress.advance(layout.data_bytes)

    def _collect(self, state: dict[str, Any]) -> tuple[list[Piece], dict[str, Any]]:
        pieces: list[Piece] = []
        values: dict[str, Any] = {}
        shapes: dict[str, str] = {}
        for leaf in flatten(state, shapes=shapes):
            value = leaf.value
            if not isinstance(value, torch.Tensor):
                values["/".join(leaf.path)] = value
                continue
            if leaf.path[0] == RANK_STATE_KEY:
                local = value.to_local() if hasattr(value, "to_local") else value
                shape = tuple(local.shape)
                pieces.append(Piece(leaf.path, local, shape, (0,) * len(shape), rank=self.rank))
            else:
                # replicas are snapshotted too (a restarted rank reloads them from its memory
                # tier) but written to durable storage by one rank only
                local, global_shape, box = local_box(value)
                durable = saves_piece(value, self.rank)
                pieces.append(Piece(leaf.path, local, global_shape, box.offsets, durable=durable))
        if shapes:
            values[CONTAINERS_KEY] = shapes
        return pieces, snapshot_values(values)

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        if self.memory is not None:
            try:
                buf = self.memory.buffer(slot, nbytes)
                pin(buf)
                return buf
            except CheckpointError as exc:
                logger.warning("memory tier skipped for this save: %s", exc)
        current = self._private.get(slot)
        if current is None or current.numel() != nbytes:
            if current is not None:
                unpin(current)
            # page-aligned like a memory-tier mapping, so the shard write can bypass the page
            # cache (O_DIRECT); torch.empty's 64-byte alignment would send it through the cache
            current = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes]
            pin(current)
            self._private[slot] = current
        return current

    def _persist(self, job: _SaveJob) -> None:
        """The background part of one save: persist, resolve its future, then fill the mirrors
        from the same staging buffer (its slot is not reused while this job runs)."""
        try:
            ref, part = self._persist_or_raise(job)
        except Exception as exc:
            job.future.set_result(self._persist_failed(job.step, job.attempt, exc))
            return
        job.future.set_result(ref)
        if part is not None:
            for mirror in self.mirrors:
                self._mirror(mirror, job, part)

    def _persist_failed(self, step: int, attempt: str, exc: Exception) -> None:
        """Report a failed save as an event (warning + metric) and tell rank 0; never raise."""
        logger.warning(
            "checkpoint save of step %d to %s failed; training continues from the previous checkpoint: %s",
            step,
            self.storage.uri,
            exc,
        )
        self._metrics.save_failures.inc()
        event("checkpoint_failed", step=step, uri=self.storage.uri, error=str(exc)[:300])
        self.last_error = exc
        if isinstance(exc, _Refused):  # every rank refuses on its own: nothing to tell rank 0
            return None
        if self.rank != 0:
            self._report_failure(step, attempt, exc)
        else:  # a rank waiting to save this step again needs no longer wait for this attempt
            with contextlib.suppress(Exception):
                self.storage.write_atomic(f"{step_dir(step)}/{_gave_up(attempt)}", str(exc)[:500].encode())
        return None

    def _report_failure(
        self, step: int, attempt: str, exc: Exception, storage: Storage | None = None
    ) -> None:
        """Tell rank 0 this part will not come to ``storage`` (default: the checkpoint URI), so it
        does not wait ``commit_timeout_s`` for it."""
        record = PartRecord(step, self.rank, self.world_size, attempt, error=str(exc)[:500])
        try:
            (storage or self.storage).write_atomic(
                f"{step_dir(step)}/{part_name(self.rank)}", record.to_json()
            )
        except Exception as again:  # the storage itself is down: rank 0 fails on its own
            logger.debug("could not record the failed save of step %d: %s", step, again)

    def _persist_or_raise(self, job: _SaveJob) -> tuple[CheckpointRef, PartRecord | None]:
        """Write the shard and part record; on rank 0 commit. The part is None when the step was
        already committed (nothing was written)."""
        step, attempt, slot, layout, progress = job.step, job.attempt, job.slot, job.layout, job.progress
        data = job.data
        directory = step_dir(step)
        name = shard_name(self.rank)
        durable = [p for p in layout.pieces if p.durable]
        ref = CheckpointRef(
            step, f"{self.storage.uri.rstrip('/')}/{directory}", "durable", committed=self.rank == 0
        )
        written: Future[None] | None = None
        if self.config.memory_tier:
            self._saved_origin()  # rank 0 makes it first thing: the others' snapshots record it
        if job.rewrite and self.rank == 0:
            # uncommit the damaged copy first; the others write their parts again regardless
            self.storage.delete(f"{directory}/{MANIFEST_NAME}")
        earlier = self._published.get(step) if self.rank != 0 and not job.rewrite else None
        if earlier is not None:
            # the same step again (a final save after the loop's last periodic one): rank 0 may
            # still be committing the earlier attempt, with the checksums of the bytes this rank
            # wrote then; wait for its decision (a manifest, or its note that it gave up) instead
            # of writing other bytes under them
            _appears(
                self.storage,
                f"{directory}/{MANIFEST_NAME}",
                self.config.commit_timeout_s,
                also=f"{directory}/{_gave_up(earlier)}",
            )
        committed = not job.rewrite and self.storage.exists(f"{directory}/{MANIFEST_NAME}")
        if committed and not job.known:
            raise _Refused(
                f"checkpoint step {step} is already committed in {self.storage.uri} by a run this "
                "one did not load it from; it is not overwritten. Resume with load_latest, save "
                "this run to another URI, or remove the old steps there"
            )
        if not committed:
            if not progress.fused:
                # an async save writes after its snapshot: a write streaming out alongside the
                # copy slows the copy the training loop waits for (1 GiB here, medians of 9:
                # blocking 67 ms with the write alongside, 58 ms without, memcpy 50; durable
                # 252 ms and 301 ms). A blocking save's caller waits for both: there it overlaps.
                progress.wait(layout.data_bytes)
            # the shard streams out while its checksums are computed here (fsync leaves the CPU idle)
            shard = job.durable_shard() if durable else None
            skip = len(layout.durable_header)  # file offset -> data offset
            written = self._io.submit(
                self._write_shard, f"{directory}/{name}", shard, lambda end: progress.wait(end - skip)
            )
        crcs: dict[int, list[int]] = {}
        for p in layout.pieces:
            progress.wait(p.start + p.nbytes)
            done = progress.crcs.get(id(p))
            crcs[id(p)] = done if done is not None else crc_slices(data[p.start : p.start + p.nbytes])
        progress.wait(layout.data_bytes)
        if self.memory is not None and self.memory.holds(slot, job.buf):
            snapshot = self._part(
                step, attempt, MemoryTier.shard(slot), layout.header, layout.pieces, crcs, job.values
            )
            self.memory.commit(slot, dataclasses.replace(snapshot, origin=self._saved_origin()))
        if written is None:
            logger.info(
                "checkpoint step %d is already committed in %s; not rewriting it", step, self.storage.uri
            )
            return dataclasses.replace(ref, committed=True), None
        written.result()
        part = self._part(step, attempt, name, layout.durable_header, durable, crcs, job.values)
        if self.rank == 0:
            self._ours = self._ours | {step}  # before the commit: a purge that lists it knows it
        self._publish(self.storage, step, attempt, part)
        if self.rank == 0:
            self._metrics.last_step.set(step)
            seconds = round(time.perf_counter() - job.started, 4)
            event("checkpoint_saved", step=step, uri=self.storage.uri, seconds=seconds)
            self._purges.append(self._purge.submit(self._retain, step, job.skipped))
        self._metrics.saves.inc()
        return ref, part

    def _publish(self, storage: Storage, step: int, attempt: str, part: PartRecord) -> None:
        """Hand this rank's part of ``step`` to rank 0 through ``storage``; on rank 0, commit
        (its own part goes straight into the manifest: one small write and read less)."""
        if self.rank != 0:
            storage.write_atomic(f"{step_dir(step)}/{part_name(self.rank)}", part.to_json())
            if storage is self.storage:
                self._published[step] = attempt
        else:
            self._commit(storage, step, attempt, part)

    def _mirror(self, mirror: Storage, job: _SaveJob, part: PartRecord) -> None:
        """Copy this rank's shard and part record of the job's step to ``mirror``; rank 0 then
        commits there with the same protocol. A failure is logged and counted, never raised."""
        step, attempt = job.step, job.attempt
        directory = step_dir(step)
        try:
            if job.rewrite and self.rank == 0:
                mirror.delete(f"{directory}/{MANIFEST_NAME}")
            elif not job.rewrite and mirror.exists(f"{directory}/{MANIFEST_NAME}"):
                return
            if part.file_name is not None:
                mirror.write(f"{directory}/{part.file_name}", job.durable_shard())
            self._publish(mirror, step, attempt, part)
            if self.rank == 0:
                self._apply_retention(mirror, step, job.skipped)
        except Exception as exc:
            logger.warning(
                "copying checkpoint step %d to the mirror %s failed (%s still holds it): %s",
                step,
                mirror.uri,
                self.storage.uri,
                exc,
            )
            self._metrics.mirror_failures.inc()
            event("checkpoint_mirror_failed", step=step, uri=mirror.uri, error=str(exc)[:300])
            if self.rank != 0:
                self._report_failure(step, attempt, exc, mirror)

    def _saved_origin(self) -> str | None:
        """The durable location's id (``ORIGIN_NAME``), made by rank 0 as its first save there
        starts (one writer: a store that ignores create-only writes still keeps one id). The
        other ranks wait for it once, briefly. None where it cannot be read or written, or has
        not come (a snapshot without it is never loaded)."""
        if self._origin is None:
            try:
                self._origin = _read_origin(self.storage)
                deadline = time.monotonic() + (0.0 if self._origin_waited else _ORIGIN_WAIT_S)
                self._origin_waited = True
                while self._origin is None and self.rank != 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                    self._origin = _read_origin(self.storage)
                if self._origin is None and self.rank == 0:
                    fresh = uuid.uuid4().hex
                    try:
                        self.storage.write_atomic(ORIGIN_NAME, fresh.encode(), exclusive=True)
                        self._origin = fresh
                    except FileExistsError:  # made meanwhile (another Checkpointer of the job)
                        self._origin = _read_origin(self.storage)
            except Exception as exc:
                logger.warning("cannot read or write %s in %s: %s", ORIGIN_NAME, self.storage.uri, exc)
        return self._origin

    def _part(
        self,
        step: int,
        attempt: str,
        file_name: str,
        header: bytes,
        pieces: list[Piece],
        crcs: dict[int, list[int]],
        values: dict[str, Any],
    ) -> PartRecord:
        return part_record(step, self.rank, self.world_size, attempt, file_name, header, pieces, crcs, values)

    def _write_shard(self, path: str, buffers: list[memoryview] | None, ready: Callable[[int], None]) -> None:
        if buffers is None:
            return
        if self._pipelined:
            self.storage.write(path, buffers, ready=ready)  # type: ignore[call-arg]
        else:  # a storage that cannot follow the copy: wait for all of it
            ready(sum(len(memoryview(b).cast("B")) for b in buffers))
            self.storage.write(path, buffers)

    def _commit(self, storage: Storage, step: int, attempt: str, own: PartRecord) -> None:
        """Rank 0: wait for the other ranks' parts of ``attempt`` in ``storage``, then publish."""
        parts = wait_for_parts(
            storage, step, self.world_size, attempt, self.config.commit_timeout_s, self._stop, own
        )
        commit_step(storage, merge_parts(step, attempt, parts))

    def _apply_retention(self, storage: Storage, step: int, skipped: frozenset[int]) -> None:
        """The keep rules on ``storage``, judged against ``step``, the step just committed there."""
        apply_retention(
            storage,
            self.config.keep_last,
            self.config.keep_every,
            newest=step,
            superseded=skipped,
            ours=lambda: self._ours,
        )

    def _retain(self, step: int, skipped: frozenset[int]) -> None:
        try:
            self._apply_retention(self.storage, step, skipped)
        except Exception as exc:  # a listing that fails must not fail the next wait()
            logger.warning("checkpoint retention in %s failed: %s", self.storage.uri, exc)

    # -- load ---------------------------------------------------------------------------------
    def load_latest(self, state: dict[str, Any]) -> int | None:
        """Load the newest complete, verified checkpoint into ``state`` in place; its step or None.

        Tries the memory tier first (when every rank holds the same newest step), then committed
        checkpoints newest first, each from the first tier that holds it (the checkpoint URI,
        then the mirrors in order), falling back past missing or corrupt files with a warning:
        to the same step on the next tier, then to older steps. Raises ``CheckpointCorrupt``
        when checkpoints exist but none loads.

        Reads land in ``state``'s tensors before they are verified (no second copy of the
        state), so after a raise they hold parts of damaged checkpoints: re-initialise them
        before training from scratch. A fallback overwrites every tensor it loads.
        """
        self.wait()
        started = time.perf_counter()
        try:
            listed: list[int] = committed_steps(self.storage)[0]
            unlisted: Exception | None = None
        except Exception as exc:  # raising here would leave the other ranks in the collective
            listed, unlisted = [], exc
        tiers = [("durable", self.storage, listed)]
        for mirror in self.mirrors:
            try:
                tiers.append(("mirror", mirror, committed_steps(mirror)[0]))
            except Exception as exc:  # a mirror that is down must not stop a load from the others
                logger.warning(
                    "cannot list the checkpoint mirror %s; loading without it: %s", mirror.uri, exc
                )
        own_newest = max((steps[-1] for _, _, steps in tiers if steps), default=-1)
        newest, blind = self._reduce_all([own_newest, int(unlisted is not None)], dist.ReduceOp.MAX)
        if blind:
            where = f"cannot list the checkpoints in {self.storage.uri}"
            if unlisted is not None:
                raise CheckpointError(f"{where}: {unlisted}") from unlisted
            raise CheckpointError(f"another rank {where} (its error says why); no rank loaded anything")
        mem = self.memory.latest() if self.memory is not None else None
        mem_step = mem[1].step if mem and mem[1].world_size == self.world_size else -1
        if mem_step >= 0 and not self._same_origin(mem[1]):  # type: ignore[index]
            mem_step = -1
        lo, hi = self._reduce(mem_step, dist.ReduceOp.MIN), self._reduce(mem_step, dist.ReduceOp.MAX)
        problems: list[str] = []
        created: set[int] = set()  # dicts the attempts made in ``state`` (see load_into)
        every = {s for _, _, steps in tiers for s in steps}
        if mem is not None and lo == hi >= 0 and lo >= newest:
            assert self.memory is not None
            memory = self.memory
            slot, part = mem
            if self._attempt(
                lo,
                [("memory tier", lambda: self._memory_source(memory, slot, part))],
                state,
                problems,
                created,
            ):
                self._loaded(lo, "memory tier", started, every)
                return lo
        bound = math.inf
        while True:
            own = max(
                (next((s for s in reversed(steps) if s < bound), -1) for _, _, steps in tiers), default=-1
            )
            step = self._reduce(own, dist.ReduceOp.MIN)
            if step < 0:
                break
            makes = [
                (
                    f"{name} tier ({storage.uri})",
                    lambda st=storage, n=name, s=step: self._durable_source(st, n, s),
                )
                for name, storage, steps in tiers
                if step in steps
            ] or [("durable tier", lambda s=step: self._durable_source(self.storage, "durable", s))]
            tier = self._attempt(step, makes, state, problems, created)
            if tier is not None:
                self._loaded(step, tier, started, every)
                return step
            bound = step
        self._skipped = frozenset(every)  # a run that goes on from scratch replaces them all
        if problems:
            raise CheckpointCorrupt(
                f"no checkpoint in {self.storage.uri} could be loaded: " + "; ".join(problems)
            )
        return None

    def _same_origin(self, part: PartRecord) -> bool:
        """Whether a memory-tier snapshot was saved for the durable location as it is now: not
        after it was emptied, or replaced by another run's (a snapshot outlives its run)."""
        try:
            now = _read_origin(self.storage)
        except Exception as exc:
            logger.warning("cannot read %s in %s: %s", ORIGIN_NAME, self.storage.uri, exc)
            return False
        if part.origin is not None and part.origin == now:
            return True
        logger.warning(
            "not loading step %d from the memory tier (%s): it was saved for another checkpoint "
            "location than %s is now (emptied or replaced since)",
            part.step,
            self.memory.dir if self.memory is not None else "",
            self.storage.uri,
        )
        return False

    def _memory_source(self, memory: MemoryTier, slot: int, part: PartRecord) -> Source:
        verify = self.config.verify_memory
        if part.file is None or part.file_name is None:
            return Source.from_part("memory", memory.storage, part, mapped={}, verify=verify)
        try:
            mapped = memory.map(slot, part.file.size)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{memory.dir}/{part.file_name} is missing") from None
        pin(mapped)
        return Source.from_part(
            "memory", memory.storage, part, mapped={part.file_name: mapped}, verify=verify
        )

    def _durable_source(self, storage: Storage, tier: str, step: int) -> Source:
        try:
            raw = storage.read(f"{step_dir(step)}/{MANIFEST_NAME}")
        except FileNotFoundError:
            raise CheckpointCorrupt(f"checkpoint step {step} has no manifest on this rank") from None
        try:
            manifest = Manifest.from_json(raw)
        except ValueError as exc:
            raise CheckpointCorrupt(f"the manifest of step {step} is unreadable: {exc}") from None
        source = Source.from_manifest(tier, storage, manifest)
        if source.world_size != self.world_size and _has_rank_state(source):
            self._resized(source)
        return source

    def _resized(self, source: Source) -> None:
        """A checkpoint with per-rank state, saved by another number of ranks: refuse, or say
        which saved rank's state this rank gets."""
        saved, now = source.world_size, self.world_size
        where = f"checkpoint step {source.step} was saved by {saved} ranks and is loaded by {now}"
        if self.config.rank_state_on_resize == "error":
            raise CheckpointError(
                f"{where}: its {RANK_STATE_KEY!r} (per-rank state: RNG, data-loader position) has no "
                f"resharding path. Load it with {saved} ranks, or set "
                "CheckpointConfig(rank_state_on_resize='remap') to give rank R saved rank R % "
                f"{saved}'s"
            )
        if self.rank == 0:
            if now > saved:
                effect = "ranks repeat other ranks' data-loader positions and RNG states"
            else:
                lost = f"rank {now}" if saved - now == 1 else f"ranks {now} to {saved - 1}"
                effect = f"the state of saved {lost} is not loaded"
            logger.warning(
                "%s: rank R loads the %r of saved rank R %% %d (%s)", where, RANK_STATE_KEY, saved, effect
            )

    def _attempt(
        self,
        step: int,
        makes: list[tuple[str, Callable[[], Source]]],
        state: dict[str, Any],
        problems: list[str],
        created: set[int],
    ) -> str | None:
        """Load ``step`` on every rank, each from the first of its ``makes`` (tier name, source)
        that loads; the tier this rank loaded from, or None when some rank could not load it."""
        status: int = _CORRUPT
        error: BaseException | None = None
        tier: str | None = None
        for i, (name, make) in enumerate(makes):
            try:
                load_into(make(), state, self.rank, self._node_readers, created)
            except CheckpointCorrupt as exc:
                status, error = _CORRUPT, exc
                if i + 1 < len(makes):
                    logger.warning("%s; loading the same step from the next tier", exc)
                    event(
                        "checkpoint_corrupt",
                        step=step,
                        tier=name,
                        error=f"{str(exc)[:300]}; the next tier has the same step",
                    )
                continue
            except Exception as exc:
                status, error = _FATAL, exc
                break
            status, error, tier = _OK, None, name
            break
        worst = self._reduce(status, dist.ReduceOp.MAX)
        if worst == _FATAL:
            if error is not None and status == _FATAL:
                raise error
            raise CheckpointError("another rank failed to load the checkpoint; see its log")
        if worst == _CORRUPT:
            why = str(error) if error is not None else "another rank found a corrupt or missing file"
            logger.warning("skipping a checkpoint: %s; falling back to an older one", why)
            if error is not None:
                event("checkpoint_corrupt", step=step, tier=makes[-1][0], error=why[:300])
            problems.append(why)
            return None
        return tier

    def _loaded(self, step: int, tier: str, started: float, committed: set[int]) -> None:
        self._skipped = frozenset(s for s in committed if s > step)
        self._known.add(step)
        seconds = time.perf_counter() - started
        logger.info("loaded checkpoint step %d from the %s in %.3f s", step, tier, seconds)
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one per node: the agent's event log
            event("checkpoint_loaded", step=step, tier=tier, seconds=round(seconds, 4))

    # -- lifecycle ----------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every save in flight has persisted (or failed) and retention has run."""
        with self._sigterm_deferred():
            self._drain()

    def _drain(self) -> None:
        while self._pending:
            self._pending[0].result()  # still queued while it runs: a SIGTERM flush waits for it
            self._pending.popleft()
        while self._purges:
            self._purges[0].result()
            self._purges.popleft()

    def close(self, *, drop_memory: bool = False) -> None:
        """Flush saves in flight and release threads; ``drop_memory`` frees the /dev/shm snapshot."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        self._stop.set()
        self._executor.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self._purge.shutdown(wait=True)
        for private in self._private.values():
            unpin(private)
        self._private.clear()
        if self.memory is not None:
            self.memory.close()
            if drop_memory:
                remove_job(self.job, self.config.shm_root)
        for storage in (self.storage, *self.mirrors):
            close = getattr(storage, "close", None)
            if close is not None:
                close()
        atexit.unregister(self._at_exit)
        # the handler goes back only if this one's is still the current one: a handler installed
        # later (another Checkpointer's) calls this one's, which now only passes the signal on
        if (
            self._prev_sigterm is not None
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == self._on_sigterm
        ):
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @contextlib.contextmanager
    def _sigterm_deferred(self) -> Iterator[None]:
        """Main-thread work during which a SIGTERM only takes note; the flush runs at its end.

        The handler runs on the main thread, in the middle of whatever it was doing: flushing
        from inside ``save()``'s snapshot copy would wait for a save that waits for that copy.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._main_depth += 1
        try:
            yield
        finally:
            self._main_depth -= 1
            if self._main_depth == 0 and self._term is not None:
                term, self._term = self._term, None
                self._on_sigterm(*term)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._main_depth:
            self._term = (signum, frame)  # the save() or wait() under way flushes when it ends
            return
        if not self._closed:
            logger.warning("SIGTERM: flushing %d checkpoint save(s) in flight", len(self._pending))
            with contextlib.suppress(Exception):
                self._drain()
        previous = self._prev_sigterm
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


class _Refused(CheckpointError):
    """A save that each rank declines on its own (see ``_persist_or_raise``)."""


def _has_rank_state(source: Source) -> bool:
    """Whether ``source`` holds per-rank state (tensors or values under ``RANK_STATE_KEY``)."""
    prefix = RANK_STATE_KEY + "/"
    return any(t.rank is not None for t in source.tensors) or any(
        key.startswith(prefix) for values in source.values for key in values
    )


def _read_origin(storage: Storage) -> str | None:
    """The ``ORIGIN_NAME`` id at the root of ``storage``; None where there is none yet."""
    try:
        return storage.read(ORIGIN_NAME).decode("ascii", "replace").strip() or None
    except FileNotFoundError:
        return None


def env_mirrors() -> list[str]:
    """The mirrors named by ``STALWART_CHECKPOINT_MIRRORS`` (comma-separated; empty when unset)."""
    return [m.strip() for m in os.environ.get(ENV_CHECKPOINT_MIRRORS, "").split(",") if m.strip()]


def _gave_up(attempt: str) -> str:
    """The note rank 0 leaves in a step's directory when it gives ``attempt`` up."""
    return f"gave-up-{attempt}"


def _appears(storage: Storage, path: str, timeout: float = 5.0, also: str | None = None) -> bool:
    """Whether ``path`` (or ``also``) exists in ``storage``, polling (caches of network file
    systems, or another rank's decision)."""
    deadline = time.monotonic() + timeout
    while True:
        if storage.exists(path) or (also is not None and storage.exists(also)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _plain_cpu(t: torch.Tensor) -> bool:
    """A dense, contiguous CPU tensor whose bytes numpy can read as they are."""
    return (
        t.device.type == "cpu"
        and t.layout == torch.strided
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and t.numel() > 0
    )


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def _persist_allowance(nbytes: int) -> float:
    """Seconds a save of ``nbytes`` may block training before the hang monitor may call it a hang.

    Generous on purpose (a slow network file system at 50 MB/s, plus a minute): a wrong hang
    verdict restarts the job, a late one only delays the verdict on a save that really hangs.
    """
    return 60.0 + nbytes / 50e6
