"""Mirrors: a checkpoint committed on its URI is copied to further tiers (POSIX, S3) and loads
from the first tier that holds it."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from stalwart.checkpoint import CheckpointConfig, Checkpointer, committed_steps
from stalwart.checkpoint.storage_posix import PosixStorage
from stalwart.checkpoint.storage_s3 import S3Storage
from stalwart.errors import ConfigError

from .servers import CREDENTIALS, S3Server


def _config(**changes: object) -> CheckpointConfig:
    return CheckpointConfig(memory_tier=False, flush_on_sigterm=False, **changes)  # type: ignore[arg-type]


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(1 << 16, generator=g), "b": torch.randn(5, generator=g)}, "step": seed}


def _zeros() -> dict:
    return {"model": {"w": torch.zeros(1 << 16), "b": torch.zeros(5)}, "step": 0}


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_saves_commit_on_every_tier_and_load_from_the_first_that_holds_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    primary, mirror = tmp_path / "nvme", tmp_path / "fsx"
    ck = Checkpointer(str(primary), _config(keep_last=2), mirrors=[str(mirror)])
    for step in (1, 2, 3):
        assert ck.save(step, _state(step)).result() is not None
    ck.wait()  # the mirror copies follow the commit
    assert committed_steps(ck.storage) == ([2, 3], [])
    assert committed_steps(PosixStorage(str(mirror))) == ([2, 3], [])  # retention runs there too
    caplog.set_level(logging.INFO, logger="stalwart.checkpoint")
    target = _zeros()
    assert ck.load_latest(target) == 3
    assert f"from the durable tier ({primary})" in caplog.text
    shutil.rmtree(primary)  # the node's disk is gone: the mirror still has everything
    caplog.clear()
    target = _zeros()
    assert ck.load_latest(target) == 3
    assert torch.equal(target["model"]["w"], _state(3)["model"]["w"]) and target["step"] == 3
    assert f"from the mirror tier ({mirror})" in caplog.text
    ck.close()


def test_a_corrupt_shard_loads_the_same_step_from_the_mirror_not_an_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    primary, mirror = tmp_path / "a", tmp_path / "b"
    ck = Checkpointer(str(primary), _config(), mirrors=[str(mirror)])
    ck.save(1, _state(1))
    ck.save(2, _state(2))
    ck.wait()
    shard = primary / "step-000000002" / "rank-00000.safetensors"
    _flip_a_byte(shard)
    target = _zeros()
    assert ck.load_latest(target) == 2
    assert torch.equal(target["model"]["w"], _state(2)["model"]["w"])
    assert f"{shard} fails its checksum" in caplog.text
    assert "loading the same step from the next tier" in caplog.text
    _flip_a_byte(mirror / "step-000000002" / "rank-00000.safetensors")
    assert ck.load_latest(target) == 1  # corrupt on both tiers: the previous step
    assert torch.equal(target["model"]["w"], _state(1)["model"]["w"])
    ck.close()


def test_an_s3_mirror_holds_a_verified_copy(tmp_path: Path, moto: S3Server) -> None:
    bucket = moto.make_bucket(f"mirror-{uuid.uuid4().hex[:8]}")
    s3 = S3Storage(f"s3://{bucket}/run", endpoint_url=moto.endpoint, part_size=5 << 20, **CREDENTIALS)
    ck = Checkpointer(str(tmp_path / "local"), _config(), mirrors=[s3])
    state = {"w": torch.arange(3 << 20, dtype=torch.float32), "step": 4}  # 12 MiB: multipart
    assert ck.save(4, state, blocking=True) is not None
    ck.wait()
    assert committed_steps(s3) == ([4], [])
    ck.close()  # closes the storages it was given, mirrors too
    shutil.rmtree(tmp_path / "local")
    uri = f"s3://{bucket}/run"
    fresh = Checkpointer(
        str(tmp_path / "local"), _config(), mirrors=[uri], endpoint_url=moto.endpoint, **CREDENTIALS
    )
    target = {"w": torch.zeros(3 << 20), "step": 0}
    assert fresh.load_latest(target) == 4
    assert torch.equal(target["w"], state["w"]) and target["step"] == 4
    fresh.close()


def test_a_failing_mirror_never_fails_the_save(
    tmp_path: Path, moto: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = moto.make_bucket(f"mirror-{uuid.uuid4().hex[:8]}")
    s3 = S3Storage(f"s3://{bucket}", endpoint_url=moto.endpoint, **CREDENTIALS)
    registry = CollectorRegistry()
    ck = Checkpointer(str(tmp_path / "local"), _config(), mirrors=[s3], registry=registry)
    moto.client().delete_bucket(Bucket=bucket)  # the mirror goes away after start-up
    caplog.set_level(logging.WARNING)
    assert ck.save(1, {"w": torch.ones(4)}).result() is not None  # committed on the checkpoint URI
    ck.wait()
    assert committed_steps(ck.storage) == ([1], [])
    assert f"copying checkpoint step 1 to the mirror s3://{bucket} failed" in caplog.text
    assert registry.get_sample_value("stalwart_checkpoint_mirror_failures_total") == 1.0
    assert registry.get_sample_value("stalwart_checkpoint_save_failures_total") == 0.0
    target = {"w": torch.zeros(4)}
    assert ck.load_latest(target) == 1  # the mirror cannot even be listed: loads without it
    assert "loading without it" in caplog.text
    moto.client().create_bucket(Bucket=bucket)
    ck.save(2, {"w": torch.full((4,), 2.0)})
    ck.wait()
    assert committed_steps(s3) == ([2], [])
    ck.close()


def test_a_mirror_at_the_checkpoint_uri_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repeat a location"):
        Checkpointer(str(tmp_path), _config(), mirrors=[str(tmp_path)])


def test_from_env_takes_the_job_specs_uri_and_mirrors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STALWART_CHECKPOINT_URI", raising=False)
    with pytest.raises(ConfigError, match="STALWART_CHECKPOINT_URI is not set"):
        Checkpointer.from_env(_config())
    monkeypatch.setenv("STALWART_CHECKPOINT_URI", str(tmp_path / "a"))
    monkeypatch.setenv("STALWART_CHECKPOINT_MIRRORS", f"{tmp_path / 'b'}, {tmp_path / 'c'}")
    ck = Checkpointer.from_env(_config())
    assert [m.uri for m in ck.mirrors] == [str(tmp_path / "b"), str(tmp_path / "c")]
    ck.save(1, {"w": torch.ones(2)})
    ck.wait()
    for tier in ("a", "b", "c"):
        assert committed_steps(PosixStorage(str(tmp_path / tier))) == ([1], []), tier
    ck.close()
