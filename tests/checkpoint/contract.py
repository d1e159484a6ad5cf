"""The contract every ``Storage`` backend passes (after torchft's ``run_multi_recovery_test``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stalwart.checkpoint.api import Storage
from stalwart.errors import CheckpointCorrupt


def run_storage_contract(make_storage: Callable[[], Storage]) -> None:
    storage = make_storage()
    assert isinstance(storage, Storage)
    payload = np.random.default_rng(0).integers(0, 255, size=(11 << 20) + 7, dtype=np.uint8)
    head = np.frombuffer(b"header--", dtype=np.uint8)

    # write: the concatenation of the buffers, readable back in ranges and whole
    storage.write("step-000000001/rank-00000.safetensors", [memoryview(head), memoryview(payload)])
    out = np.zeros_like(payload)
    first = np.zeros(8, dtype=np.uint8)
    storage.read_into("step-000000001/rank-00000.safetensors", [(0, memoryview(first)), (8, memoryview(out))])
    assert first.tobytes() == b"header--"
    assert np.array_equal(out, payload)
    tail = np.zeros(100, dtype=np.uint8)
    storage.read_into("step-000000001/rank-00000.safetensors", [(8 + payload.size - 100, memoryview(tail))])
    assert np.array_equal(tail, payload[-100:])

    # reading past the end is a truncated file, a missing file is FileNotFoundError
    beyond = np.zeros(64, dtype=np.uint8)
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        storage.read_into(
            "step-000000001/rank-00000.safetensors", [(8 + payload.size - 10, memoryview(beyond))]
        )
    with pytest.raises(FileNotFoundError):
        storage.read("step-000000001/nothing.json")
    with pytest.raises(FileNotFoundError):
        storage.read_into("step-000000001/nothing.bin", [(0, memoryview(beyond))])

    # atomic publish: overwrite allowed, exclusive refuses an existing object
    storage.write_atomic("step-000000001/manifest.json", b'{"v": 1}')
    storage.write_atomic("step-000000001/manifest.json", b'{"v": 2}')
    assert storage.read("step-000000001/manifest.json") == b'{"v": 2}'
    with pytest.raises(FileExistsError):
        storage.write_atomic("step-000000001/manifest.json", b'{"v": 3}', exclusive=True)
    assert storage.read("step-000000001/manifest.json") == b'{"v": 2}'
    storage.write_atomic("step-000000002/manifest.json", b"{}", exclusive=True)

    # list and exists, then delete a whole directory
    assert storage.list("") == ["step-000000001/", "step-000000002/"]
    assert storage.list("step-000000001") == ["manifest.json", "rank-00000.safetensors"]
    assert storage.exists("step-000000001/manifest.json")
    assert not storage.exists("step-000000003/manifest.json")
    storage.delete("step-000000001")
    storage.delete("step-000000009")  # missing: not an error
    assert storage.list("step-000000001") == []
    # an object store's filer may list an emptied prefix for a while: it holds nothing
    assert set(storage.list("")) - {"step-000000001/"} == {"step-000000002/"}
    assert not storage.exists("step-000000001/manifest.json")


class HeldRead:
    """Wraps a storage's read of one block, ``real(*args)`` with its file offset at
    ``args[offset_at]``: the block at ``slow`` waits for ``release`` once under way, and the one
    at ``failing`` starts only when the slow one is under way. ``finished``: the slow block was
    written. A read that fails must return only once no block it started still writes."""

    def __init__(self, real: Callable[..., Any], slow: int, failing: int, offset_at: int) -> None:
        self.real, self.slow, self.failing, self.offset_at = real, slow, failing, offset_at
        self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()

    def __call__(self, *args: Any) -> Any:
        offset = args[self.offset_at]
        if offset == self.slow:
            self.started.set()
            self.release.wait(10)
            result = self.real(*args)
            self.finished.set()
            return result
        if offset == self.failing:
            self.started.wait(10)
        return self.real(*args)
