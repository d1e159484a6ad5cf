"""Tuning of torch's dynamic (c10d/etcd-v2) rendezvous for fast re-rendezvous.

While a node waits for its peers, torch's ``_DistributedRendezvousOpExecutor`` sleeps a fixed
second between polls of the rendezvous state, and the state holder serves a cached state for up
to a second. On a restart every node waits at least once, so these seconds are most of a
two-node recovery (about 1.1 of 1.3 s in the demo). A poll is one get or compare-and-set on the
store, cheap for the TCPStore at small and medium scale, so stalwart polls faster there and keeps
torch's 1 s for large jobs (``auto_poll_interval``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["auto_poll_interval", "backend_store", "set_poll_interval", "tune_handler"]

logger = logging.getLogger(__name__)

_TORCH_POLL_SECONDS = 1


def auto_poll_interval(max_nodes: int) -> float:
    """2 ms per node, between 50 ms and torch's 1 s: about 500 store polls a second in all."""
    return min(1.0, max(0.05, 0.002 * max_nodes))


def set_poll_interval(seconds: float) -> bool:
    """Make the dynamic rendezvous poll every ``seconds`` instead of every 1 s.

    Returns False (and changes nothing) when this torch has no such poll to tune.
    """
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    original: Callable[..., None] | None = getattr(dynamic_rendezvous, "_delay", None)
    if original is None:
        logger.warning("this torch's rendezvous has no poll delay to tune; keeping its own")
        return False
    original = getattr(original, "__wrapped__", original)

    # HACK: torch exposes no setting for this fixed 1 s sleep; `_delay` is looked up in the
    # module's namespace on every call, so replacing it there changes only the poll (and the
    # join skew, the only other call, which passes a range).
    def _delay(seconds: float | tuple[float, float]) -> None:
        if seconds == _TORCH_POLL_SECONDS:
            seconds = poll
        elif isinstance(seconds, tuple):
            # the random 0-0.3 s skew before joining, meant to spread many nodes' first attempts,
            # scaled like the poll: negligible for small jobs, torch's own for large ones
            seconds = (seconds[0] * poll, seconds[1] * poll)
        original(seconds=seconds)

    poll = seconds
    _delay.__wrapped__ = original  # type: ignore[attr-defined]
    dynamic_rendezvous._delay = _delay  # type: ignore[attr-defined]
    return True


def tune_handler(handler: object, seconds: float) -> bool:
    """Let ``handler``'s state cache expire after ``seconds`` (torch: 1 s), so faster polls see news.

    Returns False (and changes nothing) for handlers without such a cache (static, etcd).
    """
    holder = getattr(handler, "_state_holder", None)
    if holder is None or not hasattr(holder, "_cache_duration"):
        return False
    # HACK: torch takes the cache duration only as a constructor argument of the state holder,
    # which the handler's factory does not expose.
    holder._cache_duration = seconds
    return True


def backend_store(handler: object) -> Any:
    """The store under ``handler``'s rendezvous (c10d: its TCPStore), reachable before the first
    round completes; None when the handler has none (static, etcd) or torch moved it.

    A node that arrives after the job ended never completes a round, yet must read why it ended
    (the job-wide keys live in this store) to exit with the same code as the others.
    """
    # HACK: torch exposes a rendezvous's store only through a completed round (RendezvousInfo).
    holder = getattr(handler, "_state_holder", None)
    return getattr(getattr(holder, "_backend", None), "_store", None)
