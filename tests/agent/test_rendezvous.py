"""Rendezvous tuning: faster polls for small jobs, torch's own pace for large ones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters, dynamic_rendezvous
from torch.distributed.elastic.rendezvous import registry as rdzv_registry

from stalwart.agent.rendezvous import auto_poll_interval, set_poll_interval, tune_handler


@pytest.mark.parametrize(("nodes", "seconds"), [(1, 0.05), (2, 0.05), (100, 0.2), (500, 1.0), (4000, 1.0)])
def test_poll_interval_grows_with_the_job_and_stops_at_torchs_second(nodes: int, seconds: float) -> None:
    assert auto_poll_interval(nodes) == pytest.approx(seconds)


def test_set_poll_interval_wraps_torchs_delay_once() -> None:
    before = dynamic_rendezvous._delay
    original = getattr(before, "__wrapped__", before)
    try:
        assert set_poll_interval(0.05)
        assert set_poll_interval(0.1)  # a second call replaces, it does not nest
        assert dynamic_rendezvous._delay is not before
        assert dynamic_rendezvous._delay.__wrapped__ is original
        dynamic_rendezvous._delay(seconds=(0, 0))  # other delays pass through unchanged
    finally:
        dynamic_rendezvous._delay = before


def test_tune_handler_shortens_a_c10d_handlers_state_cache(free_port: Callable[[], int]) -> None:
    params = RendezvousParameters(
        backend="c10d",
        endpoint=f"127.0.0.1:{free_port()}",
        run_id="tune",
        min_nodes=1,
        max_nodes=1,
        is_host=True,
    )
    handler = rdzv_registry.get_rendezvous_handler(params)
    try:
        assert handler._state_holder._cache_duration == 1
        assert tune_handler(handler, 0.05)
        assert handler._state_holder._cache_duration == 0.05
    finally:
        handler.shutdown()


def test_tune_handler_leaves_handlers_without_a_state_cache_alone() -> None:
    assert not tune_handler(object(), 0.05)
