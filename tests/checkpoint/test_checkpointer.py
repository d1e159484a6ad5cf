"""Checkpointer: round trips, async snapshots, retention, fallback past damage, bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from stalwart.checkpoint import CheckpointConfig, Checkpointer, committed_steps, open_storage
from stalwart.checkpoint.api import MANIFEST_NAME, Manifest, Storage, step_dir
from stalwart.checkpoint.loader import Source, verify_source
from stalwart.checkpoint.retention import plan_retention
from stalwart.errors import CheckpointCorrupt, CheckpointError, ConfigError


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(64, 32, generator=g),
            "b": torch.randn(32, generator=g).to(torch.bfloat16),
        },
        "optim": {
            "state": {"w": {"exp_avg": torch.randn(64, 32, generator=g)}},
            "param_groups": [{"lr": 0.1 * seed}],
        },
        "step": seed,
        "rank_state": {"rng": torch.get_rng_state(), "loader": {"epoch": 1, "offset": seed * 10}},
    }


def _zeros_like(state: dict[str, Any]) -> dict[str, Any]:
    def z(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: z(x) for k, x in v.items()}
        if isinstance(v, list):
            return [z(x) for x in v]
        return None

    return z(state)


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _source(storage: Storage, step: int) -> Source:
    raw = storage.read(f"{step_dir(step)}/{MANIFEST_NAME}")
    return Source.from_manifest("durable", storage, Manifest.from_json(raw))


def _cfg(config: CheckpointConfig, **changes: Any) -> CheckpointConfig:
    fields = {f: getattr(config, f) for f in config.__slots__}  # type: ignore[attr-defined]
    return CheckpointConfig(**{**fields, **changes})


def test_save_then_load_latest_restores_every_tensor_and_value_in_place(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    ck.save(5, _state(5))
    ck.save(7, _state(7))
    ck.wait()
    target = _zeros_like(_state(0))
    w = target["model"]["w"]
    assert ck.load_latest(target) == 7
    _assert_same(target, _state(7))
    assert target["model"]["w"] is w  # in place
    ck.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
@pytest.mark.parametrize("memory_tier", [True, False], ids=["memory", "durable"])
def test_odd_tensors_round_trip_through_both_copy_paths(
    tmp_path: Path, config: CheckpointConfig, blocking: bool, memory_tier: bool
) -> None:
    # blocking saves checksum while they copy (through numpy), async ones copy with torch
    g = torch.Generator().manual_seed(3)
    state = {
        "transposed": torch.randn(33, 17, generator=g).t(),  # not contiguous
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.rand(1001, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "half": torch.randn(129, generator=g).to(torch.bfloat16),
        "negated": torch.randn(8, generator=g)._neg_view(),  # a lazy view numpy refuses
        "big": torch.randn(3 << 20, generator=g),  # several checksum blocks
    }
    expected = {k: v.clone().resolve_neg() for k, v in state.items()}
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=memory_tier, verify_memory=True))
    assert ck.save(4, state, blocking=blocking).result() is not None
    target = {k: torch.zeros_like(v.resolve_neg()) for k, v in state.items()}
    assert ck.load_latest(target) == 4
    _assert_same(target, expected)
    ck.close(drop_memory=True)
    durable = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    assert durable.load_latest(target) == 4  # the durable shard's checksums match its bytes
    _assert_same(target, expected)
    durable.close()


def test_staging_buffer_without_memory_tier_is_page_aligned_for_direct_io(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    # a 64-byte aligned torch.empty buffer sent every shard write through the page cache (3x slower)
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    buf = ck._buffer(0, 10_000)
    assert buf.numel() == 10_000 and buf.data_ptr() % 4096 == 0
    assert ck._buffer(0, 10_000) is buf  # reused
    ck.close()


def test_load_latest_with_no_checkpoint_returns_none(tmp_path: Path, config: CheckpointConfig) -> None:
    ck = Checkpointer(str(tmp_path / "empty"), config)
    assert ck.load_latest(_zeros_like(_state(0))) is None
    ck.close()


def test_save_blocks_only_for_the_snapshot_later_changes_are_not_saved(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    state = _state(1)
    expected = state["model"]["w"].clone()
    future = ck.save(1, state)
    state["model"]["w"].add_(100)  # the training step goes on while the save persists
    assert future.result() is not None
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 1
    assert torch.equal(target["model"]["w"], expected)
    ck.close()


def test_a_memory_snapshot_is_not_loaded_once_its_checkpoint_location_was_emptied_or_replaced(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # the node's memory outlives the run: a new run at the same location (same job, same
    # URI) must not start from the old run's snapshot once that location was wiped
    root = tmp_path / "ck"
    ck = Checkpointer(str(root), config)
    ck.save(500, _state(5), blocking=True)
    ck.close()  # the memory tier stays for the next process
    shutil.rmtree(root)
    fresh = Checkpointer(str(root), config)
    target = _zeros_like(_state(0))
    assert fresh.load_latest(target) is None
    assert "not loading step 500 from the memory tier" in caplog.text
    assert torch.equal(target["model"]["w"], torch.zeros_like(target["model"]["w"]))
    # replaced: another run's first save there gives the location a new id
    fresh.save(7, _state(7), blocking=True)
    fresh.close()
    caplog.clear()
    again = Checkpointer(str(root), config)
    caplog.set_level(logging.INFO, logger="stalwart.checkpoint")
    assert again.load_latest(target) == 7 and "from the memory tier" in caplog.text
    again.close(drop_memory=True)


def test_a_new_run_that_did_not_load_does_not_overwrite_the_steps_an_earlier_run_committed(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # it used to report them saved while they held the earlier run's state
    cfg = _cfg(config, memory_tier=False)
    old = Checkpointer(str(tmp_path / "ck"), cfg)
    for step in (10, 20):
        old.save(step, _state(1), blocking=True)
    old.close()
    new = Checkpointer(str(tmp_path / "ck"), cfg)  # trains from scratch: never loads
    assert new.save(10, _state(2), blocking=True).result() is None
    assert "checkpoint step 10 is already committed in" in caplog.text
    assert "Resume with load_latest, save this run to another URI" in caplog.text
    assert new.last_error is not None
    assert new.save(30, _state(2), blocking=True).result() is not None  # a new step: saved
    target = _zeros_like(_state(0))
    assert new.load_latest(target) == 30
    _assert_same(target, _state(2))
    new.close()
    target = _zeros_like(_state(0))
    again = Checkpointer(str(tmp_path / "ck"), cfg)
    assert again.load_latest(target) == 30
    caplog.clear()
    caplog.set_level(logging.INFO, logger="stalwart.checkpoint")
    again.save(30, _state(3), blocking=True)  # the step it loaded: skipped, not refused
    assert "step 30 is already committed in" in caplog.text and "not rewriting it" in caplog.text
    again.close()
    assert committed_steps(open_storage(str(tmp_path / "ck"))) == ([20, 30], [])  # keep_last=2
    source = Source.from_manifest(
        "durable",
        open_storage(str(tmp_path / "ck")),
        Manifest.from_json((tmp_path / "ck" / step_dir(20) / MANIFEST_NAME).read_bytes()),
    )
    assert verify_source(source) == []  # the earlier run's step 20, whole


def test_memory_tier_is_preferred_and_the_durable_tier_holds_the_same_step(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), config)
    ck.save(3, _state(3), blocking=True)
    caplog.set_level(logging.INFO, logger="stalwart.checkpoint")
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 3
    assert "from the memory tier" in caplog.text
    _assert_same(target, _state(3))
    ck.close(drop_memory=True)
    assert not os.path.exists(os.path.join(config.shm_root, "stalwart-test"))
    ck2 = Checkpointer(str(tmp_path / "ck"), config)
    caplog.clear()
    target = _zeros_like(_state(0))
    assert ck2.load_latest(target) == 3
    assert "from the durable tier" in caplog.text
    ck2.close(drop_memory=True)


def test_retention_keeps_the_last_n_and_every_kth(tmp_path: Path, config: CheckpointConfig) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, keep_last=2, keep_every=4, memory_tier=False))
    for step in range(1, 10):
        ck.save(step, _state(1))
    ck.wait()
    committed, incomplete = committed_steps(open_storage(str(tmp_path / "ck")))
    assert committed == [4, 8, 9] and incomplete == []
    ck.close()


def test_retention_removes_incomplete_attempts_older_than_the_newest_commit(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    crashed = tmp_path / "ck" / "step-000000002"
    crashed.mkdir(parents=True)
    (crashed / "rank-00000.safetensors").write_bytes(b"torn")
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    ck.save(3, _state(3), blocking=True)
    ck.wait()  # retention runs after the commit, on its own thread
    assert not crashed.exists()
    ck.close()


def test_saving_an_already_committed_step_does_not_rewrite_it(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    ck.save(4, _state(4), blocking=True)
    manifest = tmp_path / "ck/step-000000004/manifest.json"
    before = manifest.read_bytes()
    ck.save(4, _state(9), blocking=True)
    assert manifest.read_bytes() == before
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 4
    _assert_same(target, _state(4))
    ck.close()


def test_retention_plan_after_a_resume_from_an_older_step() -> None:
    # newest committed before the resume: 1000 (skipped on load); the run saved 910 and 920 since
    plan = plan_retention([900, 910, 920, 1000], [930, 1010], 2, 0, newest=920, superseded=frozenset({1000}))
    assert plan == [900]  # 930 may be in progress; 1000 and 1010 are not this run's to judge yet
    later = plan_retention([910, 920, 1000, 1050], [], 2, 0, newest=1050, superseded=frozenset({1000}))
    assert later == [910, 1000]  # saved past the skipped step: it goes, and is not one of the last 2
    assert plan_retention([1, 3, 5], [2, 6], 1, 0) == [1, 2, 3]  # offline (gc): the newest commit decides


def test_a_purge_that_runs_after_a_later_commit_does_not_warn_about_this_runs_own_step(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    from stalwart.checkpoint.retention import apply_retention

    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    held = threading.Event()
    ck._purge.submit(held.wait, 30)  # the purges of steps 10 and 20 run after step 30 commits
    for step in (10, 20, 30):
        ck.save(step, _state(1), blocking=True)
    held.set()
    ck.wait()
    assert committed_steps(ck.storage) == ([20, 30], [])  # the late purges ran (keep_last=2)
    assert "newer than step" not in caplog.text
    storage = open_storage(str(tmp_path / "ck"))
    apply_retention(storage, 3, newest=20)  # 30 from elsewhere: that is worth a word
    assert "steps [30] in" in caplog.text
    ck.close()


def test_a_run_resumed_past_a_damaged_checkpoint_keeps_its_saves_and_rewrites_that_step(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    uri = str(tmp_path / "ck")
    first = Checkpointer(uri, _cfg(config, memory_tier=False, keep_last=3))
    first.save(900, _state(1), blocking=True)
    first.save(1000, _state(2), blocking=True)
    first.close()
    with open(tmp_path / "ck/step-000001000/rank-00000.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    ck = Checkpointer(uri, _cfg(config, memory_tier=False, keep_last=3))
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 900
    # the steps after the resume are below the damaged 1000: retention used to take the next
    # save's directory, still being written, for a crashed attempt and delete it mid-save
    futures = [ck.save(step, _state(step)) for step in range(910, 1000, 10)]
    ck.wait()
    assert all(f.result() is not None for f in futures)
    storage = open_storage(uri)
    assert committed_steps(storage) == ([970, 980, 990, 1000], [])
    for step in (970, 980, 990):
        assert verify_source(_source(storage, step)) == []
    # saving 1000 again replaces the damaged copy instead of keeping it as "already committed"
    assert ck.save(1000, _state(7), blocking=True).result() is not None
    assert verify_source(_source(storage, 1000)) == []
    ck.close()
    fresh = Checkpointer(uri, _cfg(config, memory_tier=False))
    target = _zeros_like(_state(0))
    assert fresh.load_latest(target) == 1000
    _assert_same(target, _state(7))
    fresh.close()


def test_saving_below_an_earlier_runs_newer_checkpoints_warns_and_keeps_them(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    uri = str(tmp_path / "ck")
    old = Checkpointer(uri, _cfg(config, memory_tier=False))
    old.save(500, _state(1), blocking=True)
    old.close()
    new = Checkpointer(uri, _cfg(config, memory_tier=False, keep_last=2))  # a new run, not resumed
    for step in (10, 20, 30):
        new.save(step, _state(step), blocking=True)
    new.wait()
    assert committed_steps(open_storage(uri))[0] == [20, 30, 500]  # 500 neither counted nor deleted
    assert "steps [500] in" in caplog.text and "newer than step 10 just saved" in caplog.text
    assert caplog.text.count("newer than step") == 1  # once, not at every save
    new.close()


def test_string_keys_that_look_like_int_keys_stay_apart(tmp_path: Path, config: CheckpointConfig) -> None:
    state = {"ids": {1: torch.ones(2), "#1": torch.zeros(2), "#x": 3, 2: "two"}}
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    ck.save(1, state, blocking=True)
    loaded: dict[str, Any] = {}
    assert ck.load_latest(loaded) == 1
    _assert_same(loaded, state)
    ck.close()


def _two_checkpoints(tmp_path: Path, config: CheckpointConfig) -> Checkpointer:
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False))
    ck.save(1, _state(1))
    ck.save(2, _state(2))
    ck.wait()
    return ck


def test_a_flipped_byte_is_detected_and_the_older_checkpoint_loads_with_a_warning(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    ck = _two_checkpoints(tmp_path, config)
    shard = tmp_path / "ck/step-000000002/rank-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x40
    shard.write_bytes(bytes(raw))
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 1
    _assert_same(target, _state(1))
    assert "step-000000002/rank-00000.safetensors fails its checksum" in caplog.text
    ck.close()


@pytest.mark.parametrize("damage", ["missing", "truncated", "header", "manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    ck = _two_checkpoints(tmp_path, config)
    step2 = tmp_path / "ck/step-000000002"
    shard = step2 / "rank-00000.safetensors"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "header":
        raw = bytearray(shard.read_bytes())
        raw[20] ^= 0x01
        shard.write_bytes(bytes(raw))
    else:
        (step2 / "manifest.json").write_text('{"step": "not a manifest"')
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 1
    _assert_same(target, _state(1))
    assert "falling back" in caplog.text
    ck.close()


def _edit_manifest(path: Path, edit: Any, *, checksum: str) -> None:
    """Change a committed manifest, keeping its checksum (damage), recomputing it (a hand-made
    record: ``forge``) or dropping it (a record from before checksums: ``drop``)."""
    from stalwart.checkpoint.api import _record_crc

    body = json.loads(path.read_text())
    kept = body.pop("checksum")
    edit(body)
    if checksum != "drop":
        body["checksum"] = _record_crc(body) if checksum == "forge" else kept
    path.write_text(json.dumps(body))


@pytest.mark.parametrize(
    ("edit", "checksum", "said"),
    [
        # one digit of a data-loader position: only the record's own checksum can see it
        (lambda m: m["values"][0].update({"rank_state/loader/offset": 990}), "keep", "fails its checksum"),
        (lambda m: m["tensors"][0]["chunks"][0]["offsets"].__setitem__(0, 1), "forge", "is outside"),
        (
            lambda m: m["files"]["rank-00000.safetensors"].update({"header_bytes": -8}),
            "forge",
            "-8-byte header",
        ),
        (lambda m: m["tensors"][0]["chunks"][0]["offsets"].append(0), "forge", "is outside"),
        (lambda m: m.update({"files": {}}), "forge", "which it does not list"),
    ],
)
def test_a_damaged_or_inconsistent_manifest_falls_back_to_the_older_checkpoint(
    tmp_path: Path,
    config: CheckpointConfig,
    caplog: pytest.LogCaptureFixture,
    edit: Any,
    checksum: str,
    said: str,
) -> None:
    ck = _two_checkpoints(tmp_path, config)
    _edit_manifest(tmp_path / "ck/step-000000002/manifest.json", edit, checksum=checksum)
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 1  # not a ValueError out of numpy or zip()
    _assert_same(target, _state(1))
    assert said in caplog.text and "falling back" in caplog.text
    ck.close()


def test_a_manifest_written_before_records_had_checksums_still_loads(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    ck = _two_checkpoints(tmp_path, config)
    _edit_manifest(tmp_path / "ck/step-000000002/manifest.json", lambda m: None, checksum="drop")
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 2
    _assert_same(target, _state(2))
    ck.close()


def test_a_missing_manifest_means_the_step_is_not_a_checkpoint(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    ck = _two_checkpoints(tmp_path, config)
    (tmp_path / "ck/step-000000002/manifest.json").unlink()
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 1
    ck.close()


def test_when_every_checkpoint_is_damaged_load_raises_naming_the_files(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    ck = _two_checkpoints(tmp_path, config)
    for step in (1, 2):
        (tmp_path / f"ck/step-00000000{step}/rank-00000.safetensors").unlink()
    with pytest.raises(CheckpointCorrupt, match=r"step-000000001/rank-00000.safetensors is missing"):
        ck.load_latest(_zeros_like(_state(0)))
    ck.close()


def test_a_state_that_does_not_match_the_checkpoint_is_a_clear_error(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    ck = _two_checkpoints(tmp_path, config)
    target = _zeros_like(_state(0))
    target["model"]["w"] = torch.zeros(10, 10)
    with pytest.raises(CheckpointError, match=r"'model/w' is F32\[64, 32\] in checkpoint step 2"):
        ck.load_latest(target)
    target = _zeros_like(_state(0))
    target["model"]["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="has no tensor 'model/extra'"):
        ck.load_latest(target)
    ck.close()


def test_missing_keys_are_created_from_the_checkpoint(tmp_path: Path, config: CheckpointConfig) -> None:
    ck = _two_checkpoints(tmp_path, config)
    target: dict[str, Any] = {"model": {"w": torch.zeros(64, 32)}}
    assert ck.load_latest(target) == 2
    assert torch.equal(target["optim"]["state"]["w"]["exp_avg"], _state(2)["optim"]["state"]["w"]["exp_avg"])
    ck.close()


def test_bad_input_is_refused_with_the_fix(tmp_path: Path, config: CheckpointConfig) -> None:
    with pytest.raises(ConfigError, match="keep at least 2"):
        CheckpointConfig(keep_last=1)
    with pytest.raises(ConfigError, match="unsupported scheme"):
        Checkpointer("gs://bucket/x", config)
    ck = Checkpointer(str(tmp_path / "ck"), config)
    with pytest.raises(CheckpointError, match="neither a tensor nor JSON-able"):
        ck.save(1, {"w": torch.zeros(1), "bad": object()})
    with pytest.raises(ConfigError, match="non-negative"):
        ck.save(-1, {"w": torch.zeros(1)})
    ck.close()
    with pytest.raises(CheckpointError, match="after close"):
        ck.save(1, {"w": torch.zeros(1)})


def test_a_failed_save_is_logged_and_counted_and_training_goes_on(
    tmp_path: Path, config: CheckpointConfig, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "ck"
    ck = Checkpointer(str(root), _cfg(config, memory_tier=False), registry=registry)
    ck.save(1, _state(1), blocking=True)
    os.chmod(root, 0o500)
    (root / "step-000000002").mkdir(mode=0o500)  # a read-only target, as root cannot be denied otherwise
    try:
        blocked = root / "step-000000002" / "rank-00000.safetensors"
        blocked.mkdir()  # a directory where the shard file must go: the write fails
        future = ck.save(2, _state(2))
        assert future.result() is None
    finally:
        os.chmod(root, 0o700)
    assert registry.get_sample_value("stalwart_checkpoint_save_failures_total") == 1.0
    assert "checkpoint save of step 2" in caplog.text and "training continues" in caplog.text
    assert json.loads((root / "step-000000001/manifest.json").read_text())["step"] == 1
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 1
    ck.close()


def test_a_corrupt_memory_snapshot_falls_back_to_the_durable_tier(
    tmp_path: Path, config: CheckpointConfig, caplog: pytest.LogCaptureFixture
) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), config)
    ck.save(3, _state(3), blocking=True)
    slot = next(Path(config.shm_root).glob("stalwart-test/rank-00000/slot-*.safetensors"))
    with open(slot, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    caplog.set_level(logging.INFO, logger="stalwart.checkpoint")
    target = _zeros_like(_state(0))
    assert ck.load_latest(target) == 3
    _assert_same(target, _state(3))
    assert f"{slot.name} fails its checksum" in caplog.text
    assert "from the durable tier" in caplog.text
    ck.close(drop_memory=True)


def test_a_state_loaded_into_an_empty_dict_keeps_its_empty_dicts_lists_and_tuples(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    t = torch.arange(6.0)
    fresh_opt = torch.optim.Adam(torch.nn.Linear(4, 2).parameters())  # no step yet: "state": {}
    saved = {
        "optimizer": fresh_opt.state_dict(),
        "nested": {"a": {"b": {}}},
        "rng": [t, t + 1],  # torch.cuda.get_rng_state_all() is a list of tensors
        "pair": (t + 2, {"x": t + 3}),
        "grid": [[t, t + 4], [t + 5]],
        "mixed": [{"w": t + 6}, {}],
        "labels": ["a", "b"],  # no tensors: a value
    }
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False), distributed=False)
    ck.save(1, saved, blocking=True)
    ck.close()
    loaded: dict[str, Any] = {}
    assert Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False)).load_latest(loaded) == 1
    assert loaded["optimizer"]["state"] == {} and loaded["nested"] == {"a": {"b": {}}}
    assert type(loaded["rng"]) is list and [x.tolist() for x in loaded["rng"]] == [
        t.tolist(),
        (t + 1).tolist(),
    ]
    assert type(loaded["pair"]) is tuple and torch.equal(loaded["pair"][1]["x"], t + 3)
    assert [[x[0].item() for x in row] for row in loaded["grid"]] == [[0.0, 4.0], [5.0]]
    assert type(loaded["mixed"]) is list and loaded["mixed"][1] == {}
    assert torch.equal(loaded["mixed"][0]["w"], t + 6) and loaded["labels"] == ["a", "b"]
    torch.optim.Adam(torch.nn.Linear(4, 2).parameters()).load_state_dict(loaded["optimizer"])
    # a state that has its own container at a path keeps it
    mine: dict[str, Any] = {"rng": {"0": torch.zeros(6), "1": torch.zeros(6)}}
    assert Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False)).load_latest(mine) == 1
    assert isinstance(mine["rng"], dict) and torch.equal(mine["rng"]["1"], t + 1)


def test_containers_come_back_after_a_fallback_and_a_state_of_another_shape_is_left_alone(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    t = torch.arange(6.0)

    def state(k: int) -> dict[str, Any]:
        return {"rng": [t + k, t + k + 1], "pair": (t + k, t + 2 * k), "opt": {"state": {}}}

    cfg = _cfg(config, memory_tier=False)
    ck = Checkpointer(str(tmp_path / "ck"), cfg, distributed=False)
    ck.save(1, state(1), blocking=True)
    ck.save(2, state(2), blocking=True)
    ck.close()
    shard = tmp_path / "ck" / step_dir(2) / "rank-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    loaded: dict[str, Any] = {}
    # step 2 fails after its attempt made dicts for the lists; step 1's attempt must still
    # give back lists and tuples
    assert Checkpointer(str(tmp_path / "ck"), cfg).load_latest(loaded) == 1
    assert type(loaded["rng"]) is list and torch.equal(loaded["rng"][1], t + 2)
    assert type(loaded["pair"]) is tuple and loaded["opt"] == {"state": {}}
    # where the target holds something else, the saved shape is not forced on it
    other: dict[str, Any] = {"rng": "kept", "opt": 5}
    assert Checkpointer(str(tmp_path / "ck"), cfg).load_latest(other) == 1
    assert other["rng"] == "kept" and other["opt"] == 5
    assert type(other["pair"]) is tuple and torch.equal(other["pair"][1], t + 2)


def test_an_optimizer_state_dict_loads_into_an_empty_dict_with_its_int_keys(
    tmp_path: Path, config: CheckpointConfig
) -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ck = Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False), distributed=False)
    ck.save(1, {"model": model.state_dict(), "optimizer": opt.state_dict(), "loss": 0.5}, blocking=True)
    ck.close()
    loaded: dict[str, Any] = {}
    assert Checkpointer(str(tmp_path / "ck"), _cfg(config, memory_tier=False)).load_latest(loaded) == 1
    assert loaded["loss"] == 0.5 and set(loaded["optimizer"]["state"]) == {0, 1}
    fresh = torch.optim.Adam(torch.nn.Linear(4, 2).parameters(), lr=0.5)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.01
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_an_empty_piece_verifies_whatever_its_place_in_the_record(tmp_path: Path) -> None:
    # an empty tensor starts where the next piece does; the manifest merged from several ranks
    # may list it after that piece (a rank's own rank_state entries come last)
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(memory_tier=False, flush_on_sigterm=False))
    ck.save(1, {"rank_state": {"e": torch.empty(0)}, "w": torch.ones(4)}, blocking=True)
    ck.close()
    storage = open_storage(str(tmp_path / "ck"))
    manifest = Manifest.from_json(storage.read(f"{step_dir(1)}/{MANIFEST_NAME}"))
    starts = {t.path[-1]: t.chunks[0].start for t in manifest.tensors}
    assert starts["e"] == starts["w"]
    for tensors in (manifest.tensors, list(reversed(manifest.tensors))):
        source = Source.from_manifest("durable", storage, dataclasses.replace(manifest, tensors=tensors))
        assert verify_source(source) == []
