"""The shard format: valid safetensors, aligned pieces, checksums, flattening rules."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stalwart.checkpoint import CheckpointConfig, Checkpointer
from stalwart.checkpoint import format as fmt
from stalwart.checkpoint.format import (
    Piece,
    SliceCrcs,
    copy_bytes,
    crc_extend,
    crc_slices,
    flatten,
    plan_layout,
)
from stalwart.errors import CheckpointError


def _piece(name: str, t: torch.Tensor) -> Piece:
    return Piece((name,), t, tuple(t.shape), (0,) * t.dim())


def test_layout_orders_pieces_by_element_size_so_every_piece_stays_aligned() -> None:
    pieces = [
        _piece("a", torch.zeros(3, dtype=torch.int8)),
        _piece("b", torch.zeros(5, dtype=torch.float64)),
        _piece("c", torch.zeros(7, dtype=torch.bfloat16)),
        _piece("d", torch.zeros(1, dtype=torch.float32)),
    ]
    layout = plan_layout(pieces, {"format": "stalwart"})
    assert [p.path[0] for p in layout.pieces] == ["b", "d", "c", "a"]
    assert len(layout.header) % 64 == 0
    for p in layout.pieces:
        assert p.start % p.tensor.element_size() == 0
    assert layout.data_bytes == 3 + 40 + 14 + 4


def test_saved_shard_is_a_valid_safetensors_file(tmp_path: Path, config: CheckpointConfig) -> None:
    state = {
        "model": {
            "w": torch.randn(3, 4),
            "b": torch.arange(5, dtype=torch.bfloat16),
            "flag": torch.tensor(True),
        },
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    ck = Checkpointer(str(tmp_path / "ck"), config)
    ck.save(1, state, blocking=True)
    ck.close()
    with safe_open(str(tmp_path / "ck/step-000000001/rank-00000.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["model/b", "model/flag", "model/w", "scalar"]
        assert torch.equal(f.get_tensor("model/w"), state["model"]["w"])
        assert torch.equal(f.get_tensor("model/b"), state["model"]["b"])
        assert f.get_tensor("scalar").item() == 2.5


def test_crc_slices_split_large_buffers_and_detect_a_flipped_byte() -> None:
    data = torch.randint(0, 255, (1000,), dtype=torch.uint8).numpy()
    before = crc_slices(data)
    data[500] ^= 1
    assert crc_slices(data) != before
    assert crc_slices(data[:0]) == [0]


def test_flatten_walks_dicts_and_lists_with_tensors_and_keeps_plain_tuples_whole() -> None:
    state = {
        "opt": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}], "state": {0: {"m": torch.zeros(1)}}}
    }
    leaves = {"/".join(leaf.path): leaf.value for leaf in flatten(state)}
    assert set(leaves) == {"opt/param_groups", "opt/state/#0/m"}  # int keys stay ints
    assert leaves["opt/param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]


def test_a_key_with_a_slash_is_refused_with_the_fix() -> None:
    with pytest.raises(CheckpointError, match="contains '/'"):
        list(flatten({"a/b": torch.zeros(1)}))


def test_copy_bytes_copies_and_refuses_a_read_only_target() -> None:
    src = np.arange(3 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    copy_bytes(dst, src)
    assert np.array_equal(dst, src)
    odd = np.zeros(src.size // 2, dtype=np.uint8)
    copy_bytes(odd, src[::2])  # a strided source takes numpy's path
    assert np.array_equal(odd, src[::2])
    frozen = np.frombuffer(bytes(src.size), dtype=np.uint8)
    with pytest.raises(ValueError, match="read-only"):
        copy_bytes(frozen, src)
    assert not frozen.any()


@pytest.mark.parametrize("seed", [0, 0x1234ABCD])
def test_slice_crcs_fed_in_any_blocks_match_crc_slices(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 1000)  # many slices from a few KiB
    rng = np.random.default_rng(seed)
    for size in [0, 1, 999, 1000, 1001, 4000, 6543]:
        data = rng.integers(0, 256, size, dtype=np.uint8)
        copy = np.zeros_like(data)
        sums = SliceCrcs(size, seed)
        while sums.done < size:
            n = sums.next_block(int(rng.integers(1, 700)))
            block = data[sums.done : sums.done + n]
            if n % 2:
                sums.extend_copy(block, copy[sums.done : sums.done + n])
            else:
                copy[sums.done : sums.done + n] = block
                sums.extend(block)
        expected = crc_slices(data)
        if size:
            expected[0] = crc_extend(seed, data[:1000])
        else:
            expected = [seed]
        assert sums.crcs == expected, size
        assert np.array_equal(copy, data)


def test_the_crc32c_in_use_agrees_with_icrars_on_random_buffers() -> None:
    from crc32c import crc32c as reference

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    for _ in range(50):
        start = int(rng.integers(0, data.size))
        end = int(rng.integers(start, data.size + 1))
        seed = int(rng.integers(0, 1 << 32))
        assert fmt.crc_extend(seed, data[start:end]) == reference(data[start:end], seed)


def test_a_crc32c_rs_that_disagrees_or_fails_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from crc32c import crc32c as reference

    def wrong_past_1_mib(data: np.ndarray, crc: int = 0) -> int:
        return int(reference(data, crc)) ^ (1 if len(data) > 1 << 20 else 0)

    def failing(data: np.ndarray, crc: int = 0) -> int:
        raise RuntimeError("unsupported CPU")

    for impl in (wrong_past_1_mib, failing):
        fake = types.ModuleType("crc32c_rs")
        fake.crc32c = impl  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "crc32c_rs", fake)
        caplog.clear()
        with caplog.at_level("WARNING", logger="stalwart.checkpoint.format"):
            assert fmt._pick_crc32c() == (reference, "crc32c")
        assert "crc32c-rs failed or disagreed" in caplog.text

    monkeypatch.setitem(sys.modules, "crc32c_rs", None)  # not installed
    assert fmt._pick_crc32c() == (reference, "crc32c")
