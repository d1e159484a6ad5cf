"""POSIX storage: local NVMe, FSx for Lustre, NFS, and /dev/shm for the memory tier.

Writes and reads go through parallel ``pwrite``/``preadv`` calls on one file descriptor, straight
from and into the caller's buffers: no mmap (slow or crashing on Lustre and NFS), no temporary
copies. Small commit records are published with temp + fsync + rename + directory fsync.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from stalwart.errors import CheckpointCorrupt, CheckpointError

__all__ = ["PosixStorage"]

_BLOCK = 32 << 20


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, what: str) -> CheckpointError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"disk full while writing {what}: free space there or keep fewer checkpoints")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CheckpointError(f"cannot write {what}: {exc.strerror}; check the path's permissions")
    return CheckpointError(f"cannot write {what}: {exc}")


class PosixStorage:
    """A ``Storage`` rooted at a directory. ``threads`` parallel streams per file."""

    def __init__(self, root: str, *, threads: int = 2, fsync: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.uri = self.root
        self.fsync = fsync
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="stalwart-posix")

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def write(self, path: str, buffers: Sequence[memoryview]) -> None:
        target = self._abs(path)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise _storage_error(exc, target) from exc
        try:
            jobs = []
            offset = 0
            for buf in buffers:
                view = memoryview(buf).cast("B")
                for i in range(0, len(view), _BLOCK):
                    jobs.append(self._pool.submit(_pwrite_all, fd, view[i : i + _BLOCK], offset + i))
                offset += len(view)
            for job in jobs:
                job.result()
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(target)  # give the space back at once on ENOSPC
            raise _storage_error(exc, target) from exc
        os.close(fd)

    def write_atomic(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        target = self._abs(path)
        parent = os.path.dirname(target)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            os.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, target)  # fails with EEXIST: a create-only publish
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
            if self.fsync:
                _fsync_dir(parent)
        except FileExistsError:
            _unlink_quietly(tmp)
            raise
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _storage_error(exc, target) from exc

    def read(self, path: str) -> bytes:
        with open(self._abs(path), "rb") as f:
            return f.read()

    def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        target = self._abs(path)
        fd = os.open(target, os.O_RDONLY)
        try:
            jobs = []
            for offset, buf in requests:
                view = memoryview(buf).cast("B")
                for i in range(0, len(view), _BLOCK):
                    jobs.append(self._pool.submit(_pread_all, fd, view[i : i + _BLOCK], offset + i, target))
            for job in jobs:
                job.result()
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> list[str]:
        try:
            entries = list(os.scandir(self._abs(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name + "/" if e.is_dir() else e.name for e in entries)

    def exists(self, path: str) -> bool:
        return os.path.exists(self._abs(path))

    def size(self, path: str) -> int:
        return os.path.getsize(self._abs(path))

    def delete(self, prefix: str) -> None:
        target = self._abs(prefix)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            _unlink_quietly(target)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_all(fd: int, view: memoryview, offset: int, name: str) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise CheckpointCorrupt(f"{name} is truncated: a read at byte {offset} found the end of the file")
        view = view[n:]
        offset += n


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
