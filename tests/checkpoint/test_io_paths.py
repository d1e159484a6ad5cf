"""The fast I/O paths: direct writes that follow a copy, checksummed reads, fused load copies."""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stalwart.checkpoint import CheckpointConfig, Checkpointer, loader
from stalwart.checkpoint.api import CheckedRead
from stalwart.checkpoint.format import CHUNK_BYTES, crc_extend, crc_slices, crc_slices_copy
from stalwart.checkpoint.storage_posix import PosixStorage
from stalwart.errors import CheckpointCorrupt, CheckpointError

from .contract import HeldRead
from .ranks import run_ranks
from .servers import CREDENTIALS, S3Server
from .workers.readers_worker import TENSOR_BYTES

READERS = Path(__file__).parent / "workers" / "readers_worker.py"


def _aligned(nbytes: int, seed: int) -> tuple[mmap.mmap, np.ndarray]:
    """A page-aligned buffer (as the staging mapping is) filled with random bytes."""
    raw = mmap.mmap(-1, nbytes)
    data = np.frombuffer(raw, dtype=np.uint8)
    data[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return raw, data


@pytest.mark.parametrize("header", [0, 64, 4096 + 192])
def test_write_follows_a_copy_and_matches_byte_for_byte(tmp_path: Path, header: int) -> None:
    storage = PosixStorage(str(tmp_path))
    raw, data = _aligned(3 * 4096 * 300 + 4096 + 100, seed=header)
    head = bytes(range(256)) * (header // 256) + b"h" * (header % 256)
    body = memoryview(raw)[header:]  # file offset == buffer offset: the direct-I/O case
    copied = threading.Event()
    asked: list[int] = []

    def ready(end: int) -> None:
        asked.append(end)
        assert copied.wait(10), "the write never got its bytes"

    writer = threading.Thread(
        target=storage.write, args=("f.bin", [memoryview(head), body]), kwargs={"ready": ready}
    )
    writer.start()
    data[header:] ^= 0x5A  # "the copy": the write must see these bytes, not the earlier ones
    copied.set()
    writer.join(30)
    assert not writer.is_alive()
    expected = head + bytes(data[header:])
    assert (tmp_path / "f.bin").read_bytes() == expected
    assert max(asked) == len(expected)
    del body
    storage.close()


def test_a_failed_copy_fails_the_write_and_leaves_no_file(tmp_path: Path) -> None:
    storage = PosixStorage(str(tmp_path))
    raw, _ = _aligned(1 << 20, seed=1)

    def ready(end: int) -> None:
        raise CheckpointError("the snapshot failed: out of memory")

    with pytest.raises(CheckpointError, match="snapshot failed"):
        storage.write("f.bin", [memoryview(raw)], ready=ready)
    assert not (tmp_path / "f.bin").exists()
    storage.close()


def test_read_checked_returns_the_slice_checksums(tmp_path: Path) -> None:
    storage = PosixStorage(str(tmp_path), direct=False)
    payload = np.random.default_rng(2).integers(0, 256, CHUNK_BYTES + 3 * (1 << 20) + 17, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(b"x" * 40 + payload.tobytes())
    into = np.empty_like(payload)
    assert storage.read_checked("f.bin", 40, into) == crc_slices(payload)
    assert np.array_equal(into, payload)
    storage.close()


def test_fused_checksum_copy_equals_checksum_then_copy() -> None:
    src = np.random.default_rng(3).integers(0, 256, CHUNK_BYTES + 12345, dtype=np.uint8)
    dst = np.zeros_like(src)
    assert crc_slices_copy(src, dst) == crc_slices(src)
    assert np.array_equal(dst, src)


def test_blocking_save_round_trips_through_the_pipelined_path(tmp_path: Path, config) -> None:
    state = {f"t{i}": torch.randn(300_001 + i) for i in range(5)}  # odd sizes: unaligned edges
    ck = Checkpointer(str(tmp_path / "ck"), config)
    assert ck.save(1, state, blocking=True).result() is not None
    ck.close(drop_memory=True)
    config.memory_tier = False
    fresh = {k: torch.zeros_like(v) for k, v in state.items()}
    loader = Checkpointer(str(tmp_path / "ck"), config)
    assert loader.load_latest(fresh) == 1
    loader.close()
    assert all(torch.equal(fresh[k], v) for k, v in state.items())


def _staged_everywhere(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Send CPU targets down the device path (this machine has no GPU) with an odd staging size,
    so reads straddle neither the buffers' nor the checksum slices' edges by luck. Copies out of
    the staging buffers are deferred, as a device's are, until the buffer's next turn, and the
    buffer must not change meanwhile. The bytes sent are recorded per target tensor (by its
    first byte's address); no copy may carry more than a staging buffer holds."""
    carried: dict[int, int] = {}
    pending: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def send(self: Any, target: torch.Tensor) -> None:
        assert target.numel() <= loader._STAGE_BYTES
        base = target.data_ptr() - target.storage_offset()
        carried[base] = carried.get(base, 0) + target.numel()
        assert (id(self), self.turn) not in pending, "a staging buffer was reused before its copy ran"
        source = self.buffers[self.turn][: target.numel()]
        pending[(id(self), self.turn)] = (source, source.clone(), target)
        self.turn ^= 1

    def complete(key: tuple[int, int]) -> None:
        source, snapshot, target = pending.pop(key)
        assert torch.equal(source, snapshot), "a staging buffer was written before its copy ran"
        target.copy_(source)

    def wait_turn(self: Any) -> None:
        if (id(self), self.turn) in pending:
            complete((id(self), self.turn))

    def finish(self: Any) -> None:
        for key in [key for key in pending if key[0] == id(self)]:
            complete(key)

    monkeypatch.setattr(loader, "_direct", lambda local: False)
    monkeypatch.setattr(loader, "_STAGE_BYTES", (1 << 20) + 4099)
    monkeypatch.setattr(loader._Stager, "send", send)
    monkeypatch.setattr(loader._Stager, "wait_turn", wait_turn)
    monkeypatch.setattr(loader._Stager, "finish", finish)
    return carried


def _large_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn((CHUNK_BYTES + (3 << 20) + 12) // 4, generator=g),  # two checksum slices
        "half": torch.randn(12345, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
    }


@pytest.mark.parametrize("where", ["posix", "s3"])
def test_device_targets_stream_through_staging_buffers_and_are_verified(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    moto: S3Server,
    where: str,
) -> None:
    carried = _staged_everywhere(monkeypatch)
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
    if where == "posix":
        ck = Checkpointer(str(tmp_path / "ck"), config)
    else:  # no checksum-as-it-reads there: each read's checksum continues the slice's
        bucket = moto.make_bucket(f"staged-{uuid.uuid4().hex[:8]}")
        ck = Checkpointer(f"s3://{bucket}/ck", config, endpoint_url=moto.endpoint, **CREDENTIALS)
    target = _two_large_saves_load(ck)
    assert sorted(carried.values()) == sorted(
        v.numel() * v.element_size() for v in target.values() if v.numel()
    )

    # a byte flipped in the big tensor's second checksum slice: step 2 fails, step 1 loads
    shard = "ck/step-000000002/rank-00000.safetensors"
    if where == "posix":
        _flip_a_byte_in_the_second_slice(tmp_path / shard)
    else:
        client = moto.client()
        raw = bytearray(client.get_object(Bucket=bucket, Key=shard)["Body"].read())
        raw[-(1 << 20)] ^= 0x10
        client.put_object(Bucket=bucket, Key=shard, Body=bytes(raw))
    _assert_falls_back_to_step_1(ck, target, caplog)


def _two_large_saves_load(ck: Checkpointer) -> dict[str, torch.Tensor]:
    """Save steps 1 and 2 of ``_large_state``; load the newest into zeros (checked): the target."""
    ck.save(1, _large_state(1), blocking=True)
    ck.save(2, _large_state(2), blocking=True)
    target = {k: torch.zeros_like(v) for k, v in _large_state(0).items()}
    assert ck.load_latest(target) == 2
    for k, v in _large_state(2).items():
        assert torch.equal(target[k], v), k
    return target


def _flip_a_byte_in_the_second_slice(shard: Path) -> None:
    """Damage the big tensor of ``_large_state`` inside its second checksum slice."""
    with open(shard, "r+b") as f:
        f.seek(-(1 << 20), os.SEEK_END)
        byte = f.read(1)
        f.seek(-(1 << 20), os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))


def _assert_falls_back_to_step_1(
    ck: Checkpointer, target: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    assert ck.load_latest(target) == 1
    for k, v in _large_state(1).items():
        assert torch.equal(target[k], v), k
    assert "step-000000002/rank-00000.safetensors fails its checksum" in caplog.text
    ck.close()


def test_read_checked_continues_a_checksum_from_its_seed(tmp_path: Path) -> None:
    storage = PosixStorage(str(tmp_path), direct=False)
    payload = np.random.default_rng(4).integers(0, 256, 3 << 20, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(payload.tobytes())
    first, rest = np.empty(1000, np.uint8), np.empty(payload.size - 1000, np.uint8)
    (seed,) = storage.read_checked("f.bin", 0, first)
    assert storage.read_checked("f.bin", 1000, rest, seed) == crc_slices(payload)
    storage.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_read_without_a_seed_continues_the_previous_reads_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    # a slice read in several blocks (the device path's staging buffers): each block after the
    # first has seed None and continues the checksum where the block before it left off
    _small_direct_blocks(monkeypatch)
    calls = _spy_direct_reads(monkeypatch)
    storage = PosixStorage(str(tmp_path))
    payload = _cold_file(tmp_path / "f.bin", np.random.default_rng(5), 200_000)
    cuts = [0, 9_000, 50_000, 50_001, 100_000, 120_000, 150_000, 200_000]  # slices of 50_000 (shrunk)
    reads = [
        CheckedRead("f.bin", lo, np.empty(hi - lo, np.uint8), 0 if lo % 50_000 == 0 else None, direct)
        for lo, hi in itertools.pairwise(cuts)
    ]
    got = [crcs for crcs in storage.read_checked_many(reads)]
    assert all(len(crcs) == 1 for crcs in got)
    # the reads that end a slice carry that slice's checksum
    assert [got[i][0] for i in (1, 3, 5, 6)] == crc_slices(payload)
    assert np.array_equal(np.concatenate([r.buf for r in reads]), payload)
    assert (len(calls) > 0) == (direct and storage.direct_reads)  # direct reads where they can be
    storage.close()


def test_reads_ahead_once_the_direct_bytes_pass_one_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one large piece (``stalwart ckpt verify`` reads piece by piece) reads ahead too; a single
    # read of up to one request's worth is issued in the caller's thread
    from stalwart.checkpoint import storage_posix

    _small_direct_blocks(monkeypatch)
    modes: list[bool] = []
    real = storage_posix._DirectRequests.__init__

    def spy(self: Any, *args: Any, ahead: bool) -> None:
        modes.append(ahead)
        real(self, *args, ahead=ahead)

    monkeypatch.setattr(storage_posix._DirectRequests, "__init__", spy)
    calls = _spy_direct_reads(monkeypatch)
    storage = PosixStorage(str(tmp_path))
    payload = _cold_file(tmp_path / "f.bin", np.random.default_rng(6), 300_000)
    whole, part = np.empty_like(payload), np.empty(60_000, np.uint8)  # the request: 64 KiB here
    assert storage.read_checked("f.bin", 0, whole) == crc_slices(payload)
    assert storage.read_checked("f.bin", 4096, part) == crc_slices(payload[4096:64096])
    assert np.array_equal(whole, payload) and np.array_equal(part, payload[4096:64096])
    # two reads within one request's worth: both in the caller's thread, one after the other
    pair = [
        CheckedRead("f.bin", 10_000, np.empty(20_000, np.uint8)),
        CheckedRead("f.bin", 150_000, np.empty(30_000, np.uint8)),
    ]
    assert list(storage.read_checked_many(pair)) == [
        crc_slices(payload[10_000:30_000]),
        crc_slices(payload[150_000:180_000]),
    ]
    assert np.array_equal(pair[0].buf, payload[10_000:30_000]) and np.array_equal(
        pair[1].buf, payload[150_000:180_000]
    )
    if not storage.direct_reads:
        pytest.skip("this file system refuses O_DIRECT: no direct requests to issue")
    assert modes == [True, False, False]
    assert len(calls) == 4  # every read above went direct
    storage.close()


def _cold_file(path: Path, rng: np.random.Generator, size: int) -> np.ndarray:
    """Write ``size`` random bytes to ``path``, out of the page cache; the bytes."""
    payload = rng.integers(0, 256, size, dtype=np.uint8)
    path.write_bytes(payload.tobytes())
    _evict(path)
    return payload


def _evict(root: Path) -> None:
    """Drop ``root``'s files (or the file itself) from the page cache: a cold read, as after a
    restart on another node (cached files are read through the page cache)."""
    os.sync()
    for f in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _spy_direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the reads that take the direct path (the real function still runs)."""
    calls: list[int] = []
    real = PosixStorage._take_direct

    def counted(*args: Any) -> Any:
        crcs = real(*args)
        if crcs is not None:  # read directly to its end (None: refused, read from the page cache)
            calls.append(1)
        return crcs

    monkeypatch.setattr(PosixStorage, "_take_direct", counted)
    return calls


@pytest.mark.parametrize("offset", [0, 40, 4096, 4096 * 3 + 4000])
def test_direct_reads_match_the_file_and_its_slice_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int
) -> None:
    calls = _spy_direct_reads(monkeypatch)
    storage = PosixStorage(str(tmp_path))
    assert storage.direct_reads
    # more than one bounce buffer and one checksum slice, ending off any alignment
    payload = np.random.default_rng(offset).integers(0, 256, CHUNK_BYTES + (17 << 20) + 17, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(b"x" * offset + payload.tobytes() + b"tail")
    _evict(tmp_path / "f.bin")
    into = np.empty_like(payload)
    with storage.reading():
        assert storage.read_checked("f.bin", offset, into) == crc_slices(payload)
        assert np.array_equal(into, payload)
        # a read continuing a checksum, and one that ends exactly at the end of the file
        (seed,) = storage.read_checked("f.bin", offset, into[:5000])
        rest = np.empty(payload.size - 5000 + 4, np.uint8)
        got = storage.read_checked("f.bin", offset + 5000, rest, seed)
    # slices count from the buffer's start; the first extends the seed
    assert got == [crc_extend(0, payload[: 5000 + CHUNK_BYTES]), crc_extend(0, rest[CHUNK_BYTES:])]
    assert bytes(rest[-4:]) == b"tail"
    assert len(calls) == 2  # the 5000-byte read is too small to be worth a direct descriptor
    assert storage.direct_reads
    storage.close()


def test_a_direct_read_past_the_end_of_the_file_is_corrupt(tmp_path: Path) -> None:
    storage = PosixStorage(str(tmp_path))
    (tmp_path / "f.bin").write_bytes(b"y" * ((3 << 20) + 100))
    with pytest.raises(CheckpointCorrupt, match=r"f\.bin is truncated"):
        storage.read_checked("f.bin", 100, np.empty(4 << 20, np.uint8))
    with pytest.raises(FileNotFoundError):
        storage.read_checked("missing.bin", 0, np.empty(4 << 20, np.uint8))
    storage.close()


def test_direct_reads_fall_back_to_the_page_cache_where_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Linux 6.6+ tmpfs takes O_DIRECT, and this machine has no file system that refuses it:
    # refuse it at the open call, as FUSE file systems and older tmpfs do (EINVAL)
    calls = _spy_direct_reads(monkeypatch)
    real_open = os.open

    def refusing(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT and flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    storage = PosixStorage(str(tmp_path), direct=True)
    payload = np.random.default_rng(5).integers(0, 256, 3 << 20, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(payload.tobytes())
    for _ in range(2):  # the second read does not try again
        into = np.empty_like(payload)
        assert storage.read_checked("f.bin", 0, into) == crc_slices(payload)
        assert np.array_equal(into, payload)
        assert not storage.direct_reads and not calls
    storage.close()


def _small_direct_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the direct reads' request, minimum and checksum sizes so that a few hundred KiB
    make many requests, slices and pieces (alignment stays the real 4 KiB)."""
    from stalwart.checkpoint import format as fmt
    from stalwart.checkpoint import storage_posix

    monkeypatch.setattr(storage_posix, "_DIRECT_READ_BLOCK", 64 << 10)
    monkeypatch.setattr(storage_posix, "_READ_AHEAD_BLOCK", 24 << 10)
    # fewer buffers than the refusal test's reads: a helper that loses one per refusal stalls
    monkeypatch.setattr(storage_posix, "_READ_AHEAD_BUFFERS", 3)
    monkeypatch.setattr(storage_posix, "_DIRECT_READ_MIN", 8 << 10)
    monkeypatch.setattr(storage_posix, "_CHECKED_BLOCK", 5000)
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 50_000)


def _expected_crcs(data: np.ndarray, seed: int) -> list[int]:
    from stalwart.checkpoint import format as fmt

    crcs = crc_slices(data) if data.size else [seed]
    if data.size and seed:
        crcs[0] = crc_extend(seed, data[: fmt.CHUNK_BYTES])
    return crcs


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "stalwart-read-ahead"]


def test_many_reads_in_one_stream_match_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the read-ahead thread runs requests ahead across pieces: every piece must still
    # get its own bytes and checksums, whatever mix of direct, cached, tiny and seeded reads
    _small_direct_blocks(monkeypatch)
    calls = _spy_direct_reads(monkeypatch)
    rng = np.random.default_rng(11)
    payload = _cold_file(tmp_path / "f.bin", rng, 3 << 20)
    storage = PosixStorage(str(tmp_path))
    reads, expected = [], []
    for _ in range(60):
        offset = int(rng.integers(0, payload.size - 1))
        size = int(rng.choice([0, 1, 4095, 9000, 64 << 10, 200_000, int(rng.integers(1, 300_000))]))
        size = min(size, payload.size - offset)
        seed = int(rng.choice([0, 0x1234ABCD]))
        reads.append(CheckedRead("f.bin", offset, np.zeros(size, np.uint8), seed, bool(rng.integers(0, 4))))
        expected.append(_expected_crcs(payload[offset : offset + size], seed))
    with storage.reading():
        got = list(storage.read_checked_many(reads))
    assert got == expected
    for read in reads:
        assert np.array_equal(read.buf, payload[read.offset : read.offset + read.buf.size])
    assert calls, "no read took the direct path"
    assert not _read_ahead_threads()
    storage.close()


def test_a_bad_read_in_a_stream_raises_there_and_stops_the_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_direct_blocks(monkeypatch)
    calls = _spy_direct_reads(monkeypatch)
    payload = np.random.default_rng(12).integers(0, 256, 1 << 20, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(payload.tobytes())
    storage = PosixStorage(str(tmp_path))

    def reads(bad: CheckedRead) -> list[CheckedRead]:
        good = [CheckedRead("f.bin", i * (100 << 10), np.empty(100 << 10, np.uint8)) for i in range(3)]
        return [*good[:2], bad, good[2]]

    past_the_end = CheckedRead("f.bin", payload.size - (50 << 10), np.empty(200 << 10, np.uint8))
    missing = CheckedRead("nope.bin", 0, np.empty(200 << 10, np.uint8))
    for bad, error in [(past_the_end, CheckpointCorrupt), (missing, FileNotFoundError)]:
        _evict(tmp_path / "f.bin")
        results = storage.read_checked_many(reads(bad))
        assert next(results) == crc_slices(payload[: 100 << 10])
        assert next(results) == crc_slices(payload[100 << 10 : 200 << 10])
        assert len(calls) == 2, "the good reads did not take the direct path"
        calls.clear()
        with pytest.raises(error):
            next(results)
        assert not _read_ahead_threads()
    # a consumer that stops early (a checksum mismatch in the loader) ends the thread too
    _evict(tmp_path / "f.bin")
    results = storage.read_checked_many(reads(past_the_end))
    next(results)
    results.close()
    assert not _read_ahead_threads()
    storage.close()


def test_direct_reads_refused_at_read_time_fall_back_for_the_rest_of_a_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stalwart.checkpoint import storage_posix

    _small_direct_blocks(monkeypatch)
    real = storage_posix._pread_direct
    asked: list[int] = []

    def refusing(fd: int, view: np.ndarray, offset: int) -> int:
        asked.append(offset)
        if len(asked) == 3:  # a file system that takes the open and refuses a read
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, offset)

    monkeypatch.setattr(storage_posix, "_pread_direct", refusing)
    payload = _cold_file(tmp_path / "f.bin", np.random.default_rng(13), 1 << 20)
    storage = PosixStorage(str(tmp_path))
    reads = [CheckedRead("f.bin", i * 100_000, np.empty(100_000, np.uint8)) for i in range(8)]
    assert list(storage.read_checked_many(reads)) == [crc_slices(r.buf) for r in reads]
    for r in reads:
        assert np.array_equal(r.buf, payload[r.offset : r.offset + r.buf.size])
    assert not storage.direct_reads
    storage.close()


def test_every_direct_read_refused_at_read_time_never_stalls_a_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the read-ahead thread meets the refusals before the stream does (it is busy with a cold
    # page-cache piece): each refused read must give its bounce buffer back, or the thread
    # waits for a buffer and the stream for the thread's next message, for ever
    from stalwart.checkpoint import storage_posix

    _small_direct_blocks(monkeypatch)

    def refusing(fd: int, view: np.ndarray, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(storage_posix, "_pread_direct", refusing)
    payload = _cold_file(tmp_path / "f.bin", np.random.default_rng(14), 4 << 20)
    storage = PosixStorage(str(tmp_path))
    cold = CheckedRead("f.bin", 2 << 20, np.empty(2 << 20, np.uint8), direct=False)
    reads = [cold, *(CheckedRead("f.bin", i * 200_000, np.empty(200_000, np.uint8)) for i in range(8))]
    got: list[list[int]] = []
    # a daemon thread: a stalled stream fails the test instead of hanging the session
    stream = threading.Thread(target=lambda: got.extend(storage.read_checked_many(reads)), daemon=True)
    stream.start()
    stream.join(timeout=60)
    assert not stream.is_alive(), "the stream stalled"
    assert got == [crc_slices(r.buf) for r in reads]
    for r in reads:
        assert np.array_equal(r.buf, payload[r.offset : r.offset + r.buf.size])
    assert not storage.direct_reads and not _read_ahead_threads()
    storage.close()


def test_cpu_targets_load_by_direct_reads_and_a_flipped_byte_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _spy_direct_reads(monkeypatch)
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(memory_tier=False, flush_on_sigterm=False))
    target = _two_large_saves_load(ck)
    assert calls, "the large pieces did not take the direct path"

    _flip_a_byte_in_the_second_slice(tmp_path / "ck/step-000000002/rank-00000.safetensors")
    _assert_falls_back_to_step_1(ck, target, caplog)


def test_bad_reads_keep_direct_reads_on(tmp_path: Path) -> None:
    # EINVAL that is not the file system refusing O_DIRECT: a directory (ext4 says EINVAL to
    # O_DIRECT there) and a negative offset
    storage = PosixStorage(str(tmp_path))
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        storage.read_checked("d", 0, np.empty(4 << 20, np.uint8))
    (tmp_path / "f.bin").write_bytes(bytes(8 << 20))
    with pytest.raises(OSError):
        storage.read_checked("f.bin", -4096, np.empty(4 << 20, np.uint8))
    assert storage.direct_reads
    storage.close()


def _ddp_load_reads(
    root: Path, tmp_path: Path, local_world_size: int, monkeypatch: pytest.MonkeyPatch
) -> int:
    """Both ranks of a 2-rank DDP job load the latest checkpoint cold; the bytes the two read
    from storage together."""
    _evict(root)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    results = _run_readers("load", root, tmp_path)
    reports = [json.loads(out.strip().splitlines()[-1]) for out in results]
    assert all(r["step"] == 5 and r["exact"] for r in reports), reports
    return sum(r["read_bytes"] for r in reports)


def _run_readers(mode: str, root: Path, tmp_path: Path) -> list[str]:
    store = tmp_path / f"store-{mode}-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, str(READERS), "--mode", mode, "--root", str(root), "--store", str(store)]
    results = run_ranks([[*argv, "--rank", str(rank)] for rank in range(2)], timeout=120)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out[-3000:]}"
    return [out for _, out in results]


def test_ranks_on_one_node_read_replicated_pieces_from_storage_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DDP: every rank loads the replicated tensors from rank 0's file. Through the page cache
    # (LOCAL_WORLD_SIZE > 1) the node reads them from storage once; direct reads, which a
    # single reader on the node gets, would fetch them once per rank.
    root = tmp_path / "ck"
    _run_readers("save", root, tmp_path)
    alone = _ddp_load_reads(root, tmp_path, 1, monkeypatch)  # each rank reads as if alone: the control
    if alone < 1.5 * TENSOR_BYTES:
        pytest.skip(
            f"the control read {alone} bytes for 2 x {TENSOR_BYTES}: no block device under tmp "
            "(/proc/self/io counts none), or no direct reads there"
        )
    assert alone >= 2 * TENSOR_BYTES, "the control: each rank reads the file directly"
    shared = _ddp_load_reads(root, tmp_path, 2, monkeypatch)
    assert TENSOR_BYTES <= shared < 1.5 * TENSOR_BYTES, f"{shared} bytes read for {TENSOR_BYTES} replicated"


def test_a_file_in_the_page_cache_is_read_there_and_an_evicted_one_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stalwart.checkpoint.storage_posix import _CACHESTAT

    calls = _spy_direct_reads(monkeypatch)
    storage = PosixStorage(str(tmp_path))
    payload = np.random.default_rng(6).integers(0, 256, 8 << 20, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(payload.tobytes())  # written through the page cache
    into = np.empty_like(payload)
    assert storage.read_checked("f.bin", 0, into) == crc_slices(payload)
    if not _CACHESTAT.available:
        pytest.skip("this kernel has no cachestat(2) (Linux 6.5+): cached files are read directly")
    assert not calls
    _evict(tmp_path / "f.bin")
    into[:] = 0
    assert storage.read_checked("f.bin", 0, into) == crc_slices(payload)
    assert np.array_equal(into, payload)
    assert len(calls) == 1
    storage.close()


def test_a_failed_plain_read_returns_only_once_no_read_still_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on S3: read_into raises only after every block it started has stopped writing
    from stalwart.checkpoint import storage_posix

    (tmp_path / "f.bin").write_bytes(bytes(3 << 20))
    monkeypatch.setattr(storage_posix, "_BLOCK", 1 << 20)
    held = HeldRead(storage_posix._pread_all, slow=1 << 20, failing=8 << 20, offset_at=2)
    monkeypatch.setattr(storage_posix, "_pread_all", held)
    storage = PosixStorage(str(tmp_path), threads=4)
    threading.Timer(1.0, held.release.set).start()  # with the bug, read_into raises before this
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        storage.read_into(
            "f.bin", [(8 << 20, memoryview(bytearray(10))), (0, memoryview(bytearray(3 << 20)))]
        )
    assert held.finished.is_set(), "read_into raised while a read was still writing into the buffer"
    storage.close()


def test_a_new_directory_is_made_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a step's directory is made by its first shard write: its name in the root must be
    # fsynced too, or a power loss could drop the newest step while older ones' deletes stay
    from stalwart.checkpoint import storage_posix

    synced: list[str] = []
    real = storage_posix._fsync_dir
    monkeypatch.setattr(storage_posix, "_fsync_dir", lambda path: (synced.append(path), real(path)))
    storage = PosixStorage(str(tmp_path / "root"))
    storage.write("step-000000001/rank-00000.safetensors", [memoryview(b"x" * 10)])
    assert str(tmp_path / "root") in synced and str(tmp_path) in synced
    synced.clear()
    storage.write("step-000000001/rank-00001.safetensors", [memoryview(b"y" * 10)])
    assert synced == []  # the directory was there already
    storage.write_atomic("step-000000002/manifest.json", b"{}")
    assert synced == [str(tmp_path / "root"), str(tmp_path / "root" / "step-000000002")]
    storage.close()
