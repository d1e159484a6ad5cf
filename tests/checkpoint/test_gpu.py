"""GPU state (skipped without a CUDA device): snapshots and loads keep every byte, and order
with the caller's stream, through the memory tier and cold from the durable tier.

The CPU tests drive the same staged load path with CPU targets standing in for the device; these
check what only a GPU has: pinned staging buffers, the loader's own stream, asynchronous copies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from stalwart.checkpoint import CheckpointConfig, Checkpointer
from stalwart.checkpoint.format import CHUNK_BYTES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_state(seed: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "model": {
            # past one checksum slice and several 16 MiB staging buffers, ending off 4 KiB
            "big": torch.randn((CHUNK_BYTES + (20 << 20) + 12) // 4, generator=g, device="cuda"),
            "half": torch.randn(1000, 33, generator=g, device="cuda").to(torch.bfloat16),
            "ints": torch.randint(0, 1 << 30, (4097,), generator=g, device="cuda"),
        },
        "host": torch.randn(100, generator=torch.Generator().manual_seed(seed)),
    }


def _map(state: dict[str, Any], fn: Any) -> dict[str, Any]:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in state.items()}


def _assert_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, dict):
            _assert_equal(got[key], value)
        else:
            assert torch.equal(got[key].cpu(), value.cpu()), key


def _evict(root: Path) -> None:
    os.sync()
    for path in root.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture
def config() -> Iterator[CheckpointConfig]:
    """The memory tier on tmpfs, as in production: its mappings can be page-locked (a file on
    disk cannot be, and the pinned path would go untested)."""
    shm = tempfile.mkdtemp(prefix="stalwart-gpu-test-", dir="/dev/shm")
    try:
        yield CheckpointConfig(shm_root=shm, job="gpu", flush_on_sigterm=False)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _pinned(ck: Checkpointer) -> bool:
    assert ck.memory is not None
    return bool(ck.memory._maps) and all(
        getattr(m, "_stalwart_pinned", False) for m in ck.memory._maps.values()
    )


# ~1 s of GPU time at H200 clocks: the work queued before a save or a load is still running when
# it starts, so a missing synchronisation shows
_GPU_BUSY_CYCLES = 2_000_000_000


def _durable(root: Path) -> Checkpointer:
    return Checkpointer(str(root), CheckpointConfig(memory_tier=False, flush_on_sigterm=False))


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
def test_a_save_keeps_its_steps_values_in_both_tiers_while_training_goes_on(
    tmp_path: Path, config: CheckpointConfig, blocking: bool
) -> None:
    state = _gpu_state(1)
    want = _map(state, lambda t: t.cpu().clone())
    root = tmp_path / "ck"
    ck = Checkpointer(str(root), config)
    try:
        # the step's last kernels still run when save() is called: its device-to-host copies
        # queue behind them, and save() may return only once they are done (the persist reads
        # the buffer from another thread)
        torch.cuda._sleep(_GPU_BUSY_CYCLES)
        ck.save(1, state, blocking=blocking)
        for tensor in (state["model"]["big"], state["model"]["half"], state["host"]):
            tensor.add_(1)  # the next step, at once
        ck.wait()
        assert _pinned(ck)
        target = _map(state, torch.zeros_like)
        assert ck.load_latest(target) == 1  # the memory tier
        _assert_equal(target, want)
    finally:
        ck.close(drop_memory=True)
    _evict(root)
    durable = _durable(root)  # a replaced node: the durable tier, cold, through the staged path
    try:
        target = _map(state, torch.zeros_like)
        assert durable.load_latest(target) == 1
        _assert_equal(target, want)
    finally:
        durable.close()


def test_a_cold_load_waits_for_work_queued_on_its_targets_and_is_seen_by_later_work(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    state = _gpu_state(3)
    want = _map(state, lambda t: t.cpu().clone())
    root = tmp_path / "ck"
    ck = Checkpointer(str(root), config)
    try:
        ck.save(1, state, blocking=True)
    finally:
        ck.close(drop_memory=True)
    _evict(root)
    durable = _durable(root)
    try:
        target = _map(state, torch.zeros_like)
        assert durable.load_latest(target) == 1  # a warm-up: buffers, streams, the first read
        _evict(root)
        # work the caller queued before the load, still running when the load starts: the
        # loaded bytes must land after it, not be overwritten by it
        torch.cuda._sleep(_GPU_BUSY_CYCLES)
        for tensor in (target["model"]["big"], target["model"]["ints"]):
            tensor.fill_(7)
        assert durable.load_latest(target) == 1
        after = target["model"]["ints"].sum()  # queued on the caller's stream after the load
        _assert_equal(target, want)
        assert after.item() == want["model"]["ints"].sum().item()
    finally:
        durable.close()
