"""Fixtures: a private memory-tier root per test, and S3 servers started once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stalwart.checkpoint import CheckpointConfig

from .servers import S3Server, moto_server, seaweed_server


@pytest.fixture
def shm(tmp_path: Path) -> str:
    root = tmp_path / "shm"
    root.mkdir()
    return str(root)


@pytest.fixture
def config(shm: str) -> CheckpointConfig:
    return CheckpointConfig(shm_root=shm, job="test", flush_on_sigterm=False)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="session")
def moto() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweed_server(str(tmp_path_factory.mktemp("seaweed"))) as server:
        yield server
