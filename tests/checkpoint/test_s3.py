"""Checkpoints on S3: a real S3-protocol server (SeaweedFS) for the full path, moto for the fast one."""

from __future__ import annotations

import logging
import threading
import tracemalloc
import uuid
from typing import Any

import pytest
import torch

from stalwart.checkpoint import CheckpointConfig, Checkpointer, committed_steps, storage_s3
from stalwart.checkpoint.storage_s3 import S3Storage
from stalwart.errors import CheckpointError

from .contract import HeldRead
from .flaky_proxy import flaky_proxy
from .servers import CREDENTIALS, OUTSIDER, S3Server


def _config() -> CheckpointConfig:
    return CheckpointConfig(memory_tier=False, flush_on_sigterm=False)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(3 << 20, generator=g), "b": torch.randn(10, generator=g)},
        "step": seed,
    }


def test_multipart_checkpoints_on_seaweedfs_load_and_fall_back_past_a_corrupt_object(
    seaweed: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = seaweed.make_bucket(f"ck-{uuid.uuid4().hex[:8]}")
    uri = f"s3://{bucket}/jobs/a"
    ck = Checkpointer(uri, _config(), endpoint_url=seaweed.endpoint, part_size=5 << 20, **CREDENTIALS)
    ck.save(1, _state(1))
    ck.save(2, _state(2))
    ck.wait()
    assert committed_steps(ck.storage) == ([1, 2], [])
    client = seaweed.client()
    key = "jobs/a/step-000000002/rank-00000.safetensors"
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] > 12 << 20 and "-" in head["ETag"]  # a multipart object
    target = {"model": {"w": torch.zeros(3 << 20), "b": torch.zeros(10)}, "step": 0}
    assert ck.load_latest(target) == 2
    assert torch.equal(target["model"]["w"], _state(2)["model"]["w"]) and target["step"] == 2
    raw = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    raw[len(raw) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    assert ck.load_latest(target) == 1
    assert torch.equal(target["model"]["w"], _state(1)["model"]["w"])
    assert f"s3://{bucket}/{key} fails its checksum" in caplog.text
    ck.close()


def test_wrong_credentials_and_an_unreadable_bucket_are_clear_errors(seaweed: S3Server) -> None:
    bucket = seaweed.make_bucket(f"ck-{uuid.uuid4().hex[:8]}")
    wrong = dict(CREDENTIALS, aws_secret_access_key="not-the-secret")
    with pytest.raises(CheckpointError, match=r"denied.*check the AWS credentials"):
        Checkpointer(f"s3://{bucket}/x", _config(), endpoint_url=seaweed.endpoint, **wrong)
    with pytest.raises(CheckpointError, match="denied"):
        Checkpointer(f"s3://{bucket}/x", _config(), endpoint_url=seaweed.endpoint, **OUTSIDER)
    with pytest.raises(CheckpointError, match="'no-such-bucket' does not exist"):
        Checkpointer("s3://no-such-bucket/x", _config(), endpoint_url=seaweed.endpoint, **CREDENTIALS)


def test_an_s3_save_that_fails_is_counted_and_the_next_one_works(
    moto: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = moto.make_bucket(f"ck-{uuid.uuid4().hex[:8]}")
    storage = S3Storage(f"s3://{bucket}", endpoint_url=moto.endpoint, **CREDENTIALS)
    ck = Checkpointer(f"s3://{bucket}", _config(), storage=storage)
    small = {"w": torch.arange(10.0)}
    ck.save(1, small, blocking=True)
    client = moto.client()
    client.delete_object(Bucket=bucket, Key="step-000000001/manifest.json")
    client.delete_object(Bucket=bucket, Key="step-000000001/rank-00000.json")
    client.delete_object(Bucket=bucket, Key="step-000000001/rank-00000.safetensors")
    client.delete_bucket(Bucket=bucket)
    caplog.set_level(logging.WARNING)
    assert ck.save(2, small).result() is None
    assert "checkpoint save of step 2" in caplog.text and "does not exist" in caplog.text
    client.create_bucket(Bucket=bucket)
    assert ck.save(3, small).result() is not None
    assert committed_steps(storage) == ([3], [])
    ck.close()


def test_503_slowdown_answers_are_retried_with_backoff(moto: S3Server) -> None:
    bucket = moto.make_bucket(f"ck-{uuid.uuid4().hex[:8]}")
    with flaky_proxy(moto.endpoint, every=3) as proxy:
        storage = S3Storage(f"s3://{bucket}/p", endpoint_url=proxy.endpoint, part_size=5 << 20, **CREDENTIALS)
        ck = Checkpointer(f"s3://{bucket}/p", _config(), storage=storage)
        state = {"w": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MiB: a 3-part upload
        assert ck.save(1, state).result() is not None
        target = {"w": torch.zeros(3 << 20)}
        assert ck.load_latest(target) == 1
        assert torch.equal(target["w"], state["w"])
        ck.close()
    assert proxy.injected >= 5 and proxy.requests > proxy.injected


def test_gc_aborts_only_uploads_older_than_a_save_could_be_and_reads_every_page(
    seaweed: S3Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # SeaweedFS, not moto: moto dates every upload 2010 and ignores MaxUploads
    from stalwart.cli import main

    bucket = seaweed.make_bucket(f"ck-{uuid.uuid4().hex[:8]}")
    client = seaweed.client()
    for i in range(5):  # unfinished uploads: a crashed save's, or a save in progress
        client.create_multipart_upload(Bucket=bucket, Key=f"jobs/a/step-000000002/rank-{i:05d}.safetensors")
    client.create_multipart_upload(Bucket=bucket, Key="elsewhere/x")  # not under the URI
    storage = S3Storage(f"s3://{bucket}/jobs/a", endpoint_url=seaweed.endpoint, **CREDENTIALS)
    for key, value in CREDENTIALS.items():  # the CLI takes them from the environment
        monkeypatch.setenv({"region_name": "AWS_DEFAULT_REGION"}.get(key, key.upper()), value)
    assert storage.abort_uploads(page_size=2) == 0  # just started: they may be a live save's
    uri = f"s3://{bucket}/jobs/a"
    assert main(["ckpt", "gc", uri, "--endpoint-url", seaweed.endpoint, "--uploads-older-than", "1"]) in (
        0,
        None,
    )
    assert "aborted 0 unfinished multipart upload(s) older than 1 h" in capsys.readouterr().out
    assert storage.abort_uploads(older_than_s=0, page_size=2) == 5  # three pages
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["elsewhere/x"]


def test_a_failed_ranged_read_returns_only_once_no_read_still_writes(
    moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a load that fails on one range falls back to an older checkpoint into the same tensors:
    # no GET of the failed load may still be writing into them when read_into raises
    bucket = moto.make_bucket(f"ri-{uuid.uuid4().hex[:8]}")
    storage = S3Storage(f"s3://{bucket}/p", endpoint_url=moto.endpoint, part_size=5 << 20, **CREDENTIALS)
    storage.write("f.bin", [memoryview(bytes(15 << 20))])
    held = HeldRead(storage._get_range, slow=5 << 20, failing=20 << 20, offset_at=2)
    monkeypatch.setattr(storage, "_get_range", held)
    buf = bytearray(15 << 20)
    past_the_end = bytearray(1 << 20)
    threading.Timer(1.0, held.release.set).start()  # with the bug, read_into raises before this
    with pytest.raises(CheckpointError, match="truncated"):
        storage.read_into("f.bin", [(20 << 20, memoryview(past_the_end)), (0, memoryview(buf))])
    assert held.finished.is_set(), "read_into raised while a ranged GET was still writing into the buffer"
    storage.close()


def test_a_multipart_upload_holds_only_the_parts_in_flight(
    moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each part's body is copied when its upload starts, not all at once before the first
    bucket = moto.make_bucket(f"mp-{uuid.uuid4().hex[:8]}")
    storage = S3Storage(
        f"s3://{bucket}/p", endpoint_url=moto.endpoint, part_size=5 << 20, threads=2, **CREDENTIALS
    )
    held: list[int] = []  # bytes allocated by the storage module while each part uploads
    real = storage._call

    def spied(op: str, what: str, **kwargs: Any) -> Any:
        if op == "upload_part":
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, storage_s3.__file__)]
            )
            held.append(sum(stat.size for stat in snapshot.statistics("filename")))
        return real(op, what, **kwargs)

    monkeypatch.setattr(storage, "_call", spied)
    shard = bytes(range(256)) * (320 << 10)  # 80 MiB: 16 parts
    tracemalloc.start()
    try:
        storage.write("f.bin", [memoryview(shard)])
    finally:
        tracemalloc.stop()
    assert len(held) == 16
    assert max(held) <= 4 * (5 << 20) + (1 << 20), f"{max(held) >> 20} MiB of part bodies at once"
    assert storage.read("f.bin") == shard
    storage.close()
