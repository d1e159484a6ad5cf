from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start a ``Node`` of real worker processes; every one is killed at teardown."""
    nodes: list[Node] = []

    def make(*args: Any, **kwargs: Any) -> Node:
        n = Node(tmp_path, *args, **kwargs)
        nodes.append(n)
        return n.start()

    yield make
    for n in nodes:
        n.close()


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """Directory with Debian's ``prometheus`` and ``promtool`` (fetched into the cache on first use)."""
    from .prometheus_bin import prometheus_bin_dir

    path, why = prometheus_bin_dir()
    if path is None:
        pytest.skip(why)
    return path
