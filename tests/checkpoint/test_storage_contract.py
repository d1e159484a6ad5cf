"""Every Storage backend passes the same contract, against real files and real S3 servers."""

from __future__ import annotations

import uuid
from pathlib import Path

from stalwart.checkpoint.storage_posix import PosixStorage
from stalwart.checkpoint.storage_s3 import S3Storage

from .contract import run_storage_contract
from .servers import CREDENTIALS, S3Server


def test_posix_storage_meets_the_contract(tmp_path: Path) -> None:
    run_storage_contract(lambda: PosixStorage(str(tmp_path / "root")))


def test_s3_storage_meets_the_contract_on_moto(moto: S3Server) -> None:
    bucket = moto.make_bucket(f"c-{uuid.uuid4().hex[:8]}")
    run_storage_contract(
        lambda: S3Storage(
            f"s3://{bucket}/job/a", endpoint_url=moto.endpoint, part_size=5 << 20, **CREDENTIALS
        )
    )


def test_s3_storage_meets_the_contract_on_seaweedfs(seaweed: S3Server) -> None:
    bucket = seaweed.make_bucket(f"c-{uuid.uuid4().hex[:8]}")
    run_storage_contract(
        lambda: S3Storage(f"s3://{bucket}", endpoint_url=seaweed.endpoint, part_size=5 << 20, **CREDENTIALS)
    )
