"""The node-memory tier: staging buffers that are also the latest snapshot, in /dev/shm.

Each rank owns ``/dev/shm/stalwart-<job>/rank-<R>/`` holding ``slot-<K>.safetensors`` files (a
complete shard file each: header + data) and a ``slot-<K>.json`` part record per slot that is
committed only once the slot's bytes are final. The training loop's blocking copy writes straight
into a slot's mapping, so the snapshot costs one memcpy and the memory tier comes for free.
The files outlive the worker process: a restarted worker on the same node reloads at memory speed.

Cleanup: the files stay until ``Checkpointer.close(drop_memory=True)``, ``stalwart ckpt gc
--memory``, ``remove_job()``, or a reboot (tmpfs). Slots are reused in turn, so a job holds at most
``slots`` shard-sized files per rank.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from stalwart.checkpoint.api import PartRecord
from stalwart.checkpoint.storage_posix import PosixStorage
from stalwart.errors import CheckpointCorrupt, CheckpointError, ConfigError

__all__ = ["DEFAULT_SHM_ROOT", "MemoryTier", "job_dir", "pin", "remove_job", "unpin"]

logger = logging.getLogger(__name__)

DEFAULT_SHM_ROOT = "/dev/shm"
_JOB = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def job_dir(job: str, root: str = DEFAULT_SHM_ROOT) -> str:
    if not _JOB.match(job):
        raise ConfigError(f"checkpoint job id {job!r} must be 1-100 letters, digits, '_', '.' or '-'")
    return os.path.join(root, f"stalwart-{job}")


def remove_job(job: str, root: str = DEFAULT_SHM_ROOT) -> None:
    """Free every memory-tier snapshot of ``job`` on this node."""
    shutil.rmtree(job_dir(job, root), ignore_errors=True)


class MemoryTier:
    """One rank's shared-memory slots."""

    tier = "memory"

    def __init__(self, job: str, rank: int, slots: int, root: str = DEFAULT_SHM_ROOT) -> None:
        self.dir = os.path.join(job_dir(job, root), f"rank-{rank:05d}")
        os.makedirs(self.dir, exist_ok=True)
        self.slots = slots
        # tmpfs has nothing to flush: rename alone makes the marker atomic
        self.storage = PosixStorage(self.dir, threads=2, fsync=False)
        self._maps: dict[int, torch.Tensor] = {}

    @staticmethod
    def shard(slot: int) -> str:
        return f"slot-{slot}.safetensors"

    @staticmethod
    def marker(slot: int) -> str:
        return f"slot-{slot}.json"

    def buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor mapping the slot's file, ``nbytes`` long. Invalidates the slot first."""
        self.invalidate(slot)
        current = self._maps.get(slot)
        if current is not None and current.numel() == nbytes:
            return current
        if current is not None:
            unpin(self._maps.pop(slot))
        path = os.path.join(self.dir, self.shard(slot))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            # reserve every page now: a full tmpfs must fail here, not SIGBUS in the copy
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise CheckpointError(
                f"cannot reserve {nbytes} bytes in {self.dir} for the memory tier ({exc.strerror}); "
                "enlarge /dev/shm or disable the memory tier"
            ) from exc
        os.close(fd)
        mapped = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._maps[slot] = mapped
        return mapped

    def map(self, slot: int, nbytes: int) -> torch.Tensor:
        """The slot's file mapped read-write (reusing this process's mapping when it has one)."""
        current = self._maps.get(slot)
        if current is not None and current.numel() == nbytes:
            return current
        path = os.path.join(self.dir, self.shard(slot))
        if os.path.getsize(path) != nbytes:
            raise CheckpointCorrupt(f"{path} has {os.path.getsize(path)} bytes, its record says {nbytes}")
        mapped = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._maps[slot] = mapped
        return mapped

    def holds(self, slot: int, buf: torch.Tensor) -> bool:
        """Whether ``buf`` is the current mapping of ``slot`` (not a private fallback buffer)."""
        return self._maps.get(slot) is buf

    def invalidate(self, slot: int) -> None:
        self.storage.delete(self.marker(slot))

    def commit(self, slot: int, part: PartRecord) -> None:
        self.storage.write_atomic(self.marker(slot), part.to_json())

    def latest(self) -> tuple[int, PartRecord] | None:
        """The committed slot with the highest step, with its part record."""
        best: tuple[int, PartRecord] | None = None
        for slot in range(self.slots):
            try:
                part = PartRecord.from_json(self.storage.read(self.marker(slot)))
            except FileNotFoundError:
                continue
            except ValueError:
                logger.warning("ignoring unreadable memory-tier record %s/%s", self.dir, self.marker(slot))
                continue
            if best is None or part.step > best[1].step:
                best = (slot, part)
        return best

    def close(self) -> None:
        for mapped in self._maps.values():
            unpin(mapped)
        self._maps.clear()
        self.storage.close()


def pin(buf: torch.Tensor) -> None:
    """Page-lock a shared-memory mapping for fast device copies (CUDA only; once per mapping).
    Where the kernel refuses (a mapping of a file on disk rather than tmpfs, say), copies still
    work, through unpinned memory, and slower."""
    if not torch.cuda.is_available() or getattr(buf, "_stalwart_pinned", False):
        return
    err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0))
    if err == 0:
        buf._stalwart_pinned = True  # type: ignore[attr-defined]
        return
    global _pin_refused
    if not _pin_refused:
        _pin_refused = True
        logger.warning(
            "cannot page-lock the checkpoint's host buffer (cudaHostRegister returned CUDA error "
            "%d); device copies go through unpinned memory. Put the memory tier on tmpfs "
            "(shm_root, /dev/shm)",
            err,
        )
    _take_cuda_error()


_pin_refused = False


def _take_cuda_error() -> None:
    """A failed CUDA runtime call stays this thread's last error until it is read, and torch
    reads it after its next kernel launch, which would then raise it as its own. A throwaway
    launch reads it here."""
    try:
        torch.empty(1, dtype=torch.uint8, device="cuda").fill_(0)
    except RuntimeError:
        pass


def unpin(buf: torch.Tensor) -> None:
    """Undo ``pin`` before a mapping is dropped."""
    if getattr(buf, "_stalwart_pinned", False):
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        buf._stalwart_pinned = False  # type: ignore[attr-defined]
