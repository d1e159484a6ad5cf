"""GPU health through a fake NVML (same interface, NVML's real errors); the real one where present."""

from __future__ import annotations

import pynvml
import pytest
from prometheus_client import generate_latest

from stalwart.health.api import Action, FaultKind
from stalwart.health.gpu import GpuConfig, GpuMonitor
from stalwart.health.xid import XIDS, xid_action

from .clock import Clock, context
from .fake_nvml import FakeGpu, FakeNvml


def _monitor(nvml: FakeNvml, **cfg: object) -> tuple[GpuMonitor, Clock]:
    clock = Clock()
    m = GpuMonitor(GpuConfig(threaded=False, check_interval=1.0, **cfg), nvml=nvml)  # type: ignore[arg-type]
    m.start(context(clock))
    return m, clock


def test_xids_map_to_actions_from_the_catalog() -> None:
    assert xid_action(79)[1] is Action.REPLACE_NODE
    assert xid_action(13)[1] is Action.RESTART
    assert xid_action(43)[1] is Action.IGNORE
    assert xid_action(999)[1] is Action.WARN
    assert xid_action(13, {13: Action.IGNORE})[1] is Action.IGNORE
    assert all(bucket for _, _, bucket in XIDS.values())
    # the catalog's buckets: a downed NVLink stays down until a reset (74, 155); a retirement
    # applies at the next reset (156); corrected C2C errors and a failed retirement are notices
    assert xid_action(74)[1] is Action.REPLACE_NODE
    assert xid_action(156)[1] is Action.REPLACE_NODE
    assert xid_action(69)[1] is Action.RESTART
    assert {xid_action(x)[2] for x in (121, 147, 148, 157)} == {"IGNORE"}
    assert {xid_action(x)[1] for x in (121, 147, 148, 157)} == {Action.WARN}


def test_xid_events_become_faults_once_per_burst() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a"), FakeGpu("GPU-b")])
    m, clock = _monitor(nvml)
    assert nvml.event_sets == 1 and set(nvml.registered) == {0, 1}
    nvml.xid(1, 79)
    nvml.xid(1, 79)  # a burst of the same Xid
    nvml.xid(0, 43)  # informational: counted, no fault
    [f] = m.poll(clock())
    assert f.kind is FaultKind.GPU_XID and f.action is Action.REPLACE_NODE
    assert f.evidence["xid"] == 79 and f.evidence["gpu"] == 1 and f.evidence["uuid"] == "GPU-b"
    assert f.evidence["nvidia_resolution"] == "RESTART_BM"
    m.stop()
    m.start(context(clock))  # a new generation reuses the event set
    assert nvml.event_sets == 1
    text = generate_latest(m.metrics.registry if m.metrics else None).decode()  # type: ignore[arg-type]
    assert 'stalwart_gpu_xid_errors_total{gpu="1",xid="79"} 2.0' in text
    assert 'stalwart_gpu_healthy{gpu="1"} 0.0' in text and 'stalwart_gpu_healthy{gpu="0"} 1.0' in text


def test_ecc_remapping_throttling_and_recovery_action() -> None:
    gpu = FakeGpu("GPU-a")
    nvml = FakeNvml([gpu])
    m, clock = _monitor(nvml, throttle_checks=2)
    assert m.poll(clock()) == []
    gpu.ecc[1] = 3  # uncorrectable errors rise
    gpu.remapped_rows = (0, 1, 1, 0)
    gpu.clock_reasons = 0x40  # HW thermal slowdown
    clock.advance(1)
    faults = {(f.kind, f.action) for f in m.poll(clock())}
    assert faults == {(FaultKind.GPU_ECC, Action.RESTART), (FaultKind.GPU_ECC, Action.WARN)}
    clock.advance(1)
    [f] = m.poll(clock())
    assert f.kind is FaultKind.GPU_THROTTLE and f.evidence["reason"] == "hw_thermal"
    gpu.remapped_rows = (0, 1, 0, 1)
    gpu.recovery_action = 2
    clock.advance(1)
    got = {(f.kind, f.action, f.evidence.get("name")) for f in m.poll(clock())}
    assert (FaultKind.GPU_ECC, Action.REPLACE_NODE, None) in got
    assert (FaultKind.GPU_LOST, Action.REPLACE_NODE, "node_reboot") in got


def test_a_lost_gpu_is_reported_once_and_no_longer_read() -> None:
    gpu = FakeGpu("GPU-a")
    nvml = FakeNvml([gpu, FakeGpu("GPU-b")])
    m, clock = _monitor(nvml)
    gpu.lost = True
    clock.advance(1)
    [f] = m.poll(clock())
    assert (
        f.kind is FaultKind.GPU_LOST
        and f.action is Action.REPLACE_NODE
        and "GpuIsLost" in f.evidence["error"]
    )
    before = len(nvml.calls)
    clock.advance(1)
    assert m.poll(clock()) == []
    assert len(nvml.calls) - before == 7  # only the healthy GPU is read (7 reads)


def test_unsupported_calls_are_skipped_and_other_errors_counted() -> None:
    gpu = FakeGpu("GPU-a", unsupported={"remapped_rows"}, errors={"temperature": pynvml.NVML_ERROR_UNKNOWN})
    nvml = FakeNvml([gpu])
    m, clock = _monitor(nvml)
    for _ in range(3):
        clock.advance(1)
        assert m.poll(clock()) == []
    assert nvml.calls.count("remapped_rows") == 1  # not supported: never asked again
    assert nvml.calls.count("temperature") == 3  # other errors: asked again, counted
    text = generate_latest(m.metrics.registry if m.metrics else None).decode()  # type: ignore[arg-type]
    assert 'stalwart_nvml_errors_total{error="NVMLError_Unknown"} 3.0' in text
    assert m.disabled is None


def test_without_nvml_the_monitor_says_so_once_and_is_off(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu("x")], init_error=12)  # NVML_ERROR_LIBRARY_NOT_FOUND
    m, clock = _monitor(nvml)
    assert m.disabled and "NVMLError_LibraryNotFound" in m.disabled
    m.stop()
    m.start(context(clock))
    assert m.poll(clock()) == []
    assert sum("GPU health monitoring is off" in r.message for r in caplog.records) == 1
    text = generate_latest(m.metrics.registry if m.metrics else None).decode()  # type: ignore[arg-type]
    assert "stalwart_nvml_up 0.0" in text


def test_threaded_monitor_delivers_events_through_poll() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    clock = Clock()
    m = GpuMonitor(GpuConfig(threaded=True, event_wait_ms=20), nvml=nvml)  # type: ignore[arg-type]
    m.start(context(clock))
    try:
        nvml.xid(0, 31)
        import time

        deadline = time.monotonic() + 10
        faults = []
        while not faults and time.monotonic() < deadline:
            faults = m.poll(clock())
            time.sleep(0.02)
        assert [f.evidence["xid"] for f in faults] == [31]
    finally:
        m.close()


def test_real_nvml_when_present() -> None:
    m = GpuMonitor(GpuConfig(threaded=False))
    clock = Clock()
    m.start(context(clock))
    try:
        if m.disabled:
            assert "NVML" in m.disabled  # no GPU here: off, said once, and no crash
            return
        assert m.poll(clock()) == [] or all(f.kind.value.startswith("gpu") for f in m.poll(clock()))
        assert m._gpus and all(g.uuid.startswith("GPU-") for g in m._gpus)
    finally:
        m.close()
