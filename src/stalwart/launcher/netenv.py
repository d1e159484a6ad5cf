"""NCCL/EFA environment set-up for workers.

(Stub: filled in by the launcher work; ``stalwart.launcher.cli`` calls ``configure_network_env``.)
"""

from __future__ import annotations

from collections.abc import MutableMapping

__all__ = ["configure_network_env"]


def configure_network_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set the usual NCCL/EFA variables in ``environ`` where the user has not set them.

    Returns the effective values of every variable it manages, for printing at start.
    """
    return {}
