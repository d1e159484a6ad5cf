"""`stalwart ckpt` against real checkpoints, through the console entrypoint's error handling."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from stalwart.checkpoint import CheckpointConfig, Checkpointer
from stalwart.cli import main

from .servers import CREDENTIALS, S3Server


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ck = Checkpointer(
        str(tmp_path / "ck"), CheckpointConfig(memory_tier=False, flush_on_sigterm=False, keep_last=5)
    )
    for step in (10, 20, 30):
        ck.save(step, {"model": {"w": torch.full((64, 8), float(step))}, "step": step}, blocking=True)
    ck.close()
    (tmp_path / "ck/step-000000025").mkdir()  # a crashed attempt
    return tmp_path / "ck"


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_ls_shows_committed_and_incomplete_steps(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(["ckpt", "ls", str(root)], capsys)
    assert code == 0
    assert out.count("│ committed") == 3 and "│ incomplete" in out
    assert "2.2 KiB" in out  # 64*8 floats plus a header


def test_inspect_shows_tensors_and_values(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(["ckpt", "inspect", str(root), "--step", "20"], capsys)
    assert code == 0
    assert "model/w" in out and "[64, 8]" in out and '"step": 20' in out


def test_verify_passes_then_names_a_corrupt_file_and_exits_non_zero(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["ckpt", "verify", str(root)], capsys)[0] == 0
    shard = root / "step-000000020/rank-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    code, out = _run(["ckpt", "verify", str(root)], capsys)
    assert code == 2
    assert "CORRUPT" in out and "1 of 3 checkpoints failed verification" in out
    assert "step-000000020/rank-00000.safetensors" in out


def test_damaged_and_hand_made_manifests_are_reported_not_tracebacks(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stalwart.checkpoint.api import _record_crc

    def rewrite(step: int, change: dict[str, object], forge: bool) -> None:
        path = root / f"step-{step:09d}/manifest.json"
        body = json.loads(path.read_text())
        kept = body.pop("checksum")
        body.update(change)
        body["checksum"] = _record_crc(body) if forge else kept
        path.write_text(json.dumps(body))

    rewrite(10, {"created_at": 1e300}, forge=True)  # parses, but no date can show it
    rewrite(20, {"world_size": 3}, forge=False)  # a changed byte
    code, out = _run(["ckpt", "ls", str(root)], capsys)
    assert code == 0 and "Traceback" not in out
    assert "bad manifest" in out and out.count("│ committed") == 2  # 10 (date "?") and 30
    code, out = _run(["ckpt", "verify", str(root)], capsys)
    assert code == 2 and "Traceback" not in out
    assert "fails its checksum" in out and "1 of 3 checkpoints failed verification" in out
    rewrite(30, {"files": {}}, forge=True)  # consistent bytes, but its tensors are in no file
    code, out = _run(["ckpt", "verify", str(root)], capsys)
    assert code == 2 and "which it does not list" in out and "2 of 3" in out


def test_gc_applies_retention_and_removes_crashed_attempts(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(["ckpt", "gc", str(root), "--keep-last", "1", "--dry-run"], capsys)
    assert code == 0 and "would remove 3 checkpoint(s): 10, 20, 25" in out
    assert len(os.listdir(root)) == 4
    code, out = _run(["ckpt", "gc", str(root), "--keep-last", "1", "--keep-every", "20"], capsys)
    assert code == 0 and "removed 2 checkpoint(s): 10, 25" in out
    assert sorted(os.listdir(root)) == ["step-000000020", "step-000000030"]


def test_a_missing_step_is_a_clear_error(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(["ckpt", "inspect", str(root), "--step", "7"], capsys)
    assert code == 2 and "step 7 has no committed checkpoint" in out


def test_ls_and_verify_work_on_s3_through_an_endpoint_url(
    moto: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = moto.make_bucket(f"cli-{uuid.uuid4().hex[:8]}")
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv({"region_name": "AWS_DEFAULT_REGION"}.get(key, key.upper()), value)
    ck = Checkpointer(
        f"s3://{bucket}/run",
        CheckpointConfig(memory_tier=False, flush_on_sigterm=False),
        endpoint_url=moto.endpoint,
    )
    ck.save(5, {"w": torch.arange(6.0)}, blocking=True)
    ck.close()
    code, out = _run(["ckpt", "ls", f"s3://{bucket}/run", "--endpoint-url", moto.endpoint], capsys)
    assert code == 0 and "│ committed" in out
    code, out = _run(["ckpt", "verify", f"s3://{bucket}/run", "--endpoint-url", moto.endpoint], capsys)
    assert code == 0 and "ok" in out
