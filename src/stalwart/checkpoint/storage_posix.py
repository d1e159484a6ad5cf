"""POSIX storage: local NVMe, FSx for Lustre, NFS, and /dev/shm for the memory tier.

Writes go through parallel ``pwrite`` calls straight from the caller's buffers, and plain reads
(``read_into``) through ``preadv`` straight into them: no mmap (slow or crashing on Lustre and
NFS). Durable writes use ``O_DIRECT`` for every 4 KiB-aligned stretch of a buffer (the staging
buffer is a page-aligned mapping, so that is nearly all of a shard): the disk reads the bytes
straight from the staging buffer, with no copy into the page cache and no dirty pages left for
fsync to write back. The unaligned edges, and file systems that refuse ``O_DIRECT``, go through
the page cache; fsync still runs on every file. Small commit records are published with temp +
fsync + rename + directory fsync.

Checked reads (the loader's, ``read_checked``) use ``O_DIRECT`` too on storages that write that
way, for pieces of 1 MiB or more that no other process on the node reads and that are not
already in the page cache (``cachestat(2)``, Linux 6.5+; a file read or copied in by another
process is read from memory there): the disk writes each
aligned block into a reused 16 MiB bounce buffer, backed by huge pages where the kernel allows,
and the checksum and the copy into the caller's buffer follow while the block is in cache. A
helper thread per read stream keeps the next requests in flight meanwhile (three bounce buffers
per stream). A tensor sits anywhere in its page, so reads cannot land in it directly, and the
page cache costs the same copy; what the bounce buffers save is the page cache's readahead into
scattered pages, which drifts from run to run on virtual machines (1 GiB here: 300-1000 ms through the page
cache, 280-345 ms direct, against 250-280 ms for the raw direct read alone)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from stalwart.checkpoint.api import CheckedRead, cancel_and_wait
from stalwart.checkpoint.format import SliceCrcs
from stalwart.errors import CheckpointCorrupt, CheckpointError

__all__ = ["PosixStorage"]

_BLOCK = 32 << 20  # reads
# Writes: large blocks keep the disk's queue full between syscalls (1 GiB with two threads here:
# 8 MiB blocks 266 ms, 32 MiB 251 ms, 128 MiB 247 ms). A write that follows a copy starts with
# small blocks, so the disk starts after a few MiB are copied, and doubles up to the largest.
_WRITE_BLOCK_MAX = 128 << 20
_WRITE_BLOCK_FIRST = 8 << 20
_CHECKED_BLOCK = 1 << 20  # read, then checksum while it is in L2
_DIRECT_ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# Direct reads of at most one request's worth in a call: a 16 MiB request, in the caller's
# thread (1 GiB cold with 4 streams here, one request at a time: 4 MiB 328 ms, 8 MiB 323-340,
# 16 MiB 310-323). More than that reads ahead (a load stream's pieces or staged blocks):
# 2 MiB requests into 8 bounce buffers. A fresh buffer's first read faults in and zeroes its
# pages, and on a VM that hands freed memory back to its host that cost 40-240 ms of system time
# per load with 12 buffers of 16 MiB; smaller blocks also start each checksum sooner. 1 GiB,
# 4 streams, medians of 9 in three paired runs: 16 MiB x 3 340-366 ms (samples up to 584),
# 2 MiB x 8 320-335 (up to 373), 4 MiB x 8 346, 1 MiB x 16 354; the raw read 292-299.
# Pieces under 1 MiB stay in the page cache: a second descriptor and a bounce buffer are not
# worth a few KiB.
_DIRECT_READ_BLOCK = 16 << 20
_READ_AHEAD_BLOCK = 2 << 20
_READ_AHEAD_BUFFERS = 8
_DIRECT_READ_MIN = 1 << 20
_HUGE_PAGE = 2 << 20


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

    def __init__(
        self, root: str, *, threads: int = 2, fsync: bool = True, direct: bool | None = None
    ) -> None:
        self.root = os.path.abspath(root)
        self.uri = self.root
        self.fsync = fsync
        # direct I/O only pays off for writes that must reach the disk anyway, and reads of files
        # written that way are never in the page cache
        self.direct = fsync if direct is None else direct
        self.direct_reads = self.direct
        self._bounce = _BouncePool()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="stalwart-posix")

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def write(
        self, path: str, buffers: Sequence[memoryview], *, ready: Callable[[int], None] | None = None
    ) -> None:
        """Write ``buffers`` to ``path`` and fsync. ``ready(end)``, when given, is called before
        the bytes up to file offset ``end`` are read and blocks until they are final: the write
        follows a copy that is still filling the buffers."""
        target = self._abs(path)
        try:
            self._make_dirs(os.path.dirname(target))
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise _storage_error(exc, target) from exc
        dfd = self._open_direct(target)
        jobs: list[Future[None]] = []
        try:
            offset = 0
            block = _WRITE_BLOCK_MAX if ready is None else _WRITE_BLOCK_FIRST
            for buf in buffers:
                view = memoryview(buf).cast("B")
                for start, stop, direct in _split_aligned(view, offset, dfd is not None):
                    i = start
                    while i < stop:
                        piece = view[i : min(i + block, stop)]
                        out = dfd if direct and dfd is not None else None
                        jobs.append(self._pool.submit(_write_block, out, fd, piece, offset + i, ready))
                        i += len(piece)
                        block = min(2 * block, _WRITE_BLOCK_MAX)
                offset += len(view)
            for job in jobs:
                job.result()
            if self.fsync:
                os.fsync(fd)  # the inode's data and metadata, whichever descriptor wrote them
        except BaseException as exc:
            cancel_and_wait(jobs)  # no write may still run once the file is gone
            _close_quietly(dfd)
            os.close(fd)
            _unlink_quietly(target)  # give the space back at once on ENOSPC
            if isinstance(exc, OSError):
                raise _storage_error(exc, target) from exc
            raise
        _close_quietly(dfd)
        os.close(fd)

    def _make_dirs(self, path: str) -> None:
        """``os.makedirs``; with fsync, also the parent of each directory it made: a new
        directory's name is durable only then (a step's directory, made by its first shard)."""
        made = []
        at = path
        while not os.path.isdir(at) and os.path.dirname(at) != at:
            made.append(at)
            at = os.path.dirname(at)
        os.makedirs(path, exist_ok=True)
        if self.fsync:
            for directory in made:
                _fsync_dir(os.path.dirname(directory))

    def _open_direct(self, target: str) -> int | None:
        """A second, ``O_DIRECT`` descriptor of ``target``; None where the file system refuses it."""
        if not (self.direct and _O_DIRECT):
            return None
        try:
            return os.open(target, os.O_WRONLY | _O_DIRECT)
        except OSError:  # EINVAL: tmpfs and some FUSE file systems
            return None

    def write_atomic(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        target = self._abs(path)
        parent = os.path.dirname(target)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self._make_dirs(parent)
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
        jobs: list[Future[None]] = []
        try:
            for offset, buf in requests:
                view = memoryview(buf).cast("B")
                for i in range(0, len(view), _BLOCK):
                    jobs.append(self._pool.submit(_pread_all, fd, view[i : i + _BLOCK], offset + i, target))
            for job in jobs:
                job.result()
        except BaseException:
            # no read may still write into the caller's buffers (a load falls back to an older
            # checkpoint into the same tensors) or use the descriptor once it is closed
            cancel_and_wait(jobs)
            raise
        finally:
            os.close(fd)

    def read_checked(
        self, path: str, offset: int, buf: np.ndarray, seed: int = 0, *, direct: bool = True
    ) -> list[int]:
        """Fill ``buf`` from ``offset`` of ``path`` and return ``crc_slices(buf)``, computed while
        each block is still in cache (the first slice's checksum extends ``seed``, the checksum of
        the bytes before it). Direct reads through bounce buffers where this storage writes
        directly (see the module docstring) unless ``direct`` is False (bytes other processes on
        this node read too: the page cache serves them all from one read), else through the page
        cache. Callers read several pieces in parallel, each stream with ``read_checked_many``."""
        (crcs,) = self.read_checked_many([CheckedRead(path, offset, buf, seed, direct)])
        return crcs

    def read_checked_many(self, reads: Sequence[CheckedRead]) -> Iterator[list[int]]:
        """``read_checked`` of each read in turn, yielding each one's checksums. The direct reads'
        requests are issued by a helper thread, as far ahead as it has free bounce buffers,
        across reads: while this thread checksums and copies a block, the disk fills the next
        ones. The loader's 1 GiB cold load here, 4 streams of 16 MiB pieces with 16 MiB
        requests: 300-310 ms one request at a time, 280-298 ms with three bounce buffers (two
        stall behind each piece's small last request). See ``_READ_AHEAD_BLOCK`` for the 2 MiB
        requests that replaced them."""
        requests: _DirectRequests | None = None
        with contextlib.ExitStack() as stack:
            direct_bytes = sum(r.buf.size for r in reads if self._may_read_direct(r))
            if direct_bytes:
                # up to one request's worth is read in this thread: no helper thread for it
                ahead = direct_bytes > _DIRECT_READ_BLOCK
                block, count = (_READ_AHEAD_BLOCK, _READ_AHEAD_BUFFERS) if ahead else (_DIRECT_READ_BLOCK, 1)
                bounces = [stack.enter_context(self._bounce.take(block)) for _ in range(count)]
                requests = _DirectRequests(self, reads, bounces, block, ahead=ahead)
                stack.callback(requests.stop)
            last = 0  # the previous read's last checksum, for a read whose seed is None
            for read in reads:
                if read.seed is None:
                    read = read._replace(seed=last)
                taken = requests.next() if requests is not None else _PAGE_CACHE
                crcs: list[int] | None = None
                if taken is not _PAGE_CACHE:
                    assert requests is not None
                    crcs = self._take_direct(requests, read, taken)
                if crcs is None:
                    crcs = self._read_cached_checked(read)
                last = crcs[-1]
                yield crcs

    def _may_read_direct(self, read: CheckedRead) -> bool:
        return bool(read.direct and self.direct_reads and _O_DIRECT and read.buf.size >= _DIRECT_READ_MIN)

    def _direct_fd(self, read: CheckedRead) -> int | None:
        """An ``O_DIRECT`` descriptor for ``read``, or None: page cache (see ``read_checked``)."""
        if not self._may_read_direct(read):
            return None
        dfd = self._open_direct_read(self._abs(read.path))
        if dfd is None:
            return None
        try:
            cached = _CACHESTAT.mostly_cached(dfd, read.offset, read.buf.size)
        except BaseException:
            os.close(dfd)
            raise
        if cached:
            os.close(dfd)  # already in memory (read or copied in by another process): read it there
            return None
        return dfd

    def _take_direct(self, requests: _DirectRequests, read: CheckedRead, taken: object) -> list[int] | None:
        """Checksum and copy the blocks ``requests`` read for ``read`` (``taken`` is the first);
        None where the file system refused the direct reads: the caller reads the page cache."""
        target, buf = self._abs(read.path), read.buf
        assert read.seed is not None  # resolved by read_checked_many
        sums, end = SliceCrcs(buf.size, read.seed), read.offset + buf.size
        for at, lo, hi in _direct_requests(read.offset, buf.size, requests.block):
            if isinstance(taken, BaseException):  # the read's last message
                if isinstance(taken, OSError) and taken.errno == errno.EINVAL and read.offset >= 0:
                    self.direct_reads = False  # aligned requests refused at read time
                    return None
                raise taken
            assert isinstance(taken, _Block) and taken.lo == lo
            try:
                if lo + taken.got <= at:
                    raise CheckpointCorrupt(
                        f"{target} is truncated: a read at byte {at} found the end of the file"
                    )
                src = taken.bounce[at - lo : min(lo + taken.got, end) - lo]
                i = 0
                while i < src.size:  # in cache-sized blocks, each checksummed and copied
                    n = sums.next_block(min(_CHECKED_BLOCK, src.size - i))
                    sums.extend_copy(src[i : i + n], buf[sums.done : sums.done + n])
                    i += n
                if lo + taken.got < min(hi, end):
                    raise CheckpointCorrupt(
                        f"{target} is truncated: a read at byte {lo + taken.got} found the end of the file"
                    )
            finally:
                requests.give_back(taken.bounce)
            if sums.done < buf.size:
                taken = requests.next()
        return sums.crcs

    def _read_cached_checked(self, read: CheckedRead) -> list[int]:
        target, buf = self._abs(read.path), read.buf
        assert read.seed is not None  # resolved by read_checked_many
        if buf.size == 0:
            if not os.path.exists(target):
                raise FileNotFoundError(errno.ENOENT, "no such file", target)
            return [read.seed]
        fd = os.open(target, os.O_RDONLY)
        try:
            sums = SliceCrcs(buf.size, read.seed)
            while sums.done < buf.size:
                block = buf[sums.done : sums.done + sums.next_block(_CHECKED_BLOCK)]
                _pread_all(fd, memoryview(block), read.offset + sums.done, target)
                sums.extend(block)
            return sums.crcs
        finally:
            os.close(fd)

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold the direct reads' bounce buffers for reuse across the reads of one load."""
        return self._bounce.held()

    def _open_direct_read(self, target: str) -> int | None:
        """An ``O_DIRECT`` descriptor of ``target`` for a checked read; None where direct reads
        are off or the file system refuses them (then they stay off for this storage)."""
        if not (self.direct_reads and _O_DIRECT):
            return None
        try:
            return os.open(target, os.O_RDONLY | _O_DIRECT)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            if not os.path.isdir(target):  # ext4 says EINVAL for a directory too: not a refusal
                self.direct_reads = False  # older tmpfs and some FUSE file systems
            return None

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


def _write_block(
    dfd: int | None, fd: int, view: memoryview, offset: int, ready: Callable[[int], None] | None
) -> None:
    """One block: through the direct descriptor when given (the page cache where the file system
    refuses its alignment), else through ``fd``; after ``ready`` says its bytes are final."""
    if ready is not None:
        ready(offset + len(view))
    if dfd is not None:
        try:
            _pwrite_all(dfd, view, offset)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _pwrite_all(fd, view, offset)


def _split_aligned(view: memoryview, offset: int, direct: bool) -> list[tuple[int, int, bool]]:
    """Split ``view`` (written at file ``offset``) into ranges; the middle one is direct-I/O-able
    when the buffer address and the file offset agree modulo the alignment."""
    n = len(view)
    if not direct or n < 2 * _DIRECT_ALIGN:
        return [(0, n, False)]
    address = np.frombuffer(view, dtype=np.uint8).ctypes.data
    if (address - offset) % _DIRECT_ALIGN:
        return [(0, n, False)]
    head = -offset % _DIRECT_ALIGN
    body_end = head + (n - head) // _DIRECT_ALIGN * _DIRECT_ALIGN
    ranges = [(0, head, False), (head, body_end, True), (body_end, n, False)]
    return [r for r in ranges if r[1] > r[0]]


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CachestatResult(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


class _Cachestat:
    """``cachestat(2)`` (Linux 6.5+): whether a file range is in the page cache. Off where the
    kernel or a seccomp filter refuses the call, and off Linux."""

    _NUMBER = 451  # the same on every architecture (new system calls share their numbers)

    def __init__(self) -> None:
        self.available = sys.platform.startswith("linux")
        self._syscall: Callable[..., int] | None = None

    def mostly_cached(self, fd: int, offset: int, size: int) -> bool:
        if not self.available or offset < 0:
            return False
        if self._syscall is None:
            self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        span, stat = _CachestatRange(offset, size), _CachestatResult()
        if self._syscall(self._NUMBER, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
                self.available = False
            return False
        return stat.nr_cache * mmap.PAGESIZE * 2 >= size


_CACHESTAT = _Cachestat()


class _BouncePool:
    """Aligned buffers for direct reads (``_READ_AHEAD_BUFFERS`` per read stream at a time).
    While a ``held()`` block runs (a whole load), returned buffers are kept for the next read: a
    fresh mapping's first direct read pays its page faults."""

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}  # by size
        self._holds = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                if not self._holds:
                    self._free.clear()  # unmapped with their last reference

    @contextlib.contextmanager
    def take(self, nbytes: int) -> Iterator[np.ndarray]:
        with self._lock:
            free = self._free.setdefault(nbytes, [])
            buf = free.pop() if free else None
        if buf is None:
            buf = huge_page_buffer(nbytes)
        try:
            yield buf
        finally:
            with self._lock:
                if self._holds:
                    self._free.setdefault(nbytes, []).append(buf)


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of anonymous memory aligned to a huge page, backed by huge pages where the
    kernel allows: the disk then writes into few physically contiguous runs."""
    raw = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no madvise or no THP: plain pages
        raw.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(raw, dtype=np.uint8)
    start = -whole.ctypes.data % _HUGE_PAGE
    return whole[start : start + nbytes]


def _direct_requests(offset: int, size: int, block: int) -> Iterator[tuple[int, int, int]]:
    """``(at, lo, hi)`` per direct request of ``size`` bytes from ``offset``: the bytes from
    ``at`` come from the aligned request ``[lo, hi)``. Requests end on multiples of the block in
    the file: a piece that starts a few KiB past one reads that stretch first, then whole aligned
    blocks (1 GiB in 16 MiB pieces here: 16 MiB + 4 KiB requests 350 ms, 16 MiB ones 300 ms)."""
    at, end = offset, offset + size
    end_aligned = -(-end // _DIRECT_ALIGN) * _DIRECT_ALIGN
    while at < end:
        lo = at - at % _DIRECT_ALIGN
        hi = min((lo // block + 1) * block, end_aligned)
        yield at, lo, hi
        at = min(hi, end)


class _Block(NamedTuple):
    bounce: np.ndarray
    lo: int
    got: int  # bytes read from ``lo``: fewer than asked only at the end of the file


_PAGE_CACHE = object()  # _DirectRequests' message for a read it leaves to the page cache


class _DirectRequests:
    """The direct requests of a list of reads, in order, each into a free bounce buffer. Per
    read, ``next()`` gives ``_PAGE_CACHE`` (not read directly), or its ``_Block``s in order, the
    last one cut short by the end of the file or replaced by the ``OSError`` that ended the read;
    the consumer gives each bounce buffer back. ``ahead``: a thread of its own issues them, as
    far ahead as there are free buffers; else each is issued when the consumer asks for it."""

    def __init__(
        self,
        storage: PosixStorage,
        reads: Sequence[CheckedRead],
        bounces: list[np.ndarray],
        block: int,
        *,
        ahead: bool,
    ) -> None:
        self._storage = storage
        self.block = block  # the requests end on its multiples in the file
        self._reads = reads
        self._free: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        for bounce in bounces:
            self._free.put(bounce)
        self._stopped = False
        self._messages = self._issue()
        self._out: queue.SimpleQueue[object] | None = None
        self._thread: threading.Thread | None = None
        if ahead:
            self._out = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="stalwart-read-ahead", daemon=True)
            self._thread.start()

    def next(self) -> object:
        return self._out.get() if self._out is not None else next(self._messages)

    def give_back(self, bounce: np.ndarray) -> None:
        self._free.put(bounce)

    def stop(self) -> None:
        """End the requests (at once, or after the one under way) before the buffers go."""
        self._stopped = True
        self._free.put(None)
        if self._thread is not None:
            self._thread.join()
        else:
            self._messages.close()

    def _run(self) -> None:
        assert self._out is not None
        for message in self._messages:
            self._out.put(message)

    def _issue(self) -> Iterator[object]:
        for read in self._reads:
            if self._stopped:
                return
            dfd: int | None = None
            try:
                dfd = self._storage._direct_fd(read)
                if dfd is None:
                    yield _PAGE_CACHE
                    continue
                end = read.offset + read.buf.size
                for _, lo, hi in _direct_requests(read.offset, read.buf.size, self.block):
                    bounce = self._free.get()
                    if bounce is None or self._stopped:
                        return
                    try:
                        got = _pread_direct(dfd, bounce[: hi - lo], lo)
                    except BaseException:
                        self._free.put(bounce)  # the read ends here: its buffer is free again
                        raise
                    yield _Block(bounce, lo, got)
                    if lo + got < min(hi, end):  # the end of the file: the consumer says so
                        break
            except GeneratorExit:  # stop() in this thread
                raise
            except OSError as exc:
                if exc.errno == errno.EINVAL and read.offset >= 0:
                    self._storage.direct_reads = False  # refused at read time: no more tries
                yield exc
            except BaseException as exc:  # never leave the consumer waiting
                yield exc
                return
            finally:
                _close_quietly(dfd)


def _pread_direct(fd: int, view: np.ndarray, offset: int) -> int:
    """Read ``view`` (aligned) from aligned ``offset``; fewer bytes only at the end of the file."""
    got = 0
    while got < view.size:
        n = os.preadv(fd, [view[got:]], offset + got)
        got += n
        if n == 0 or got % _DIRECT_ALIGN:  # the end of the file
            break
    return got


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


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
