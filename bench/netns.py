"""A throwaway network namespace with only loopback up, for benchmarks that start servers.

torchrun's agent store binds the wildcard address; inside such a namespace nothing it opens is
reachable from, or reaches, anything outside this machine's loopback.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def loopback_netns(prefix: str = "stalwart_bench") -> Iterator[str]:
    """Create a namespace with only ``lo`` up; yield its name; delete it on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
