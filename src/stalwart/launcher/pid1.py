"""Container init duties: when stalwart is PID 1, reap zombies and forward signals.

(Stub: filled in by the launcher work; ``stalwart.launcher.cli`` calls ``run_as_init``.)
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["run_as_init"]


def run_as_init(main: Callable[[], int]) -> int:
    """Run ``main`` (the agent); if this process is PID 1, also act as init. Returns the exit code."""
    return main()
