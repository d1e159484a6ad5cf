"""Prometheus collector for the GPU monitor: its last NVML readings, never an NVML call at scrape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from stalwart.health.gpu import GpuMonitor

__all__ = ["GpuCollector"]


class GpuCollector(Collector):
    """Exposes the monitor's last NVML readings (no NVML call at scrape time)."""

    def __init__(self, monitor: GpuMonitor) -> None:
        self.m = monitor

    def collect(self) -> Any:
        m = self.m
        up = GaugeMetricFamily("stalwart_nvml_up", "1 if NVML works and GPU health is monitored.")
        up.add_metric([], 0 if m.disabled else 1)
        yield up
        errs = CounterMetricFamily("stalwart_nvml_errors", "NVML call errors, by error.", labels=["error"])
        for name, n in m._errors.items():
            errs.add_metric([name], n)
        yield errs
        xid = CounterMetricFamily(
            "stalwart_gpu_xid_errors", "Xid events, by GPU and Xid.", labels=["gpu", "xid"]
        )
        ecc = CounterMetricFamily(
            "stalwart_gpu_ecc_errors", "Volatile ECC errors.", labels=["gpu", "error_type"]
        )
        remap = GaugeMetricFamily(
            "stalwart_gpu_remapped_rows", "Remapped memory rows.", labels=["gpu", "cause"]
        )
        pending = GaugeMetricFamily(
            "stalwart_gpu_row_remap_pending", "1 if a row remap awaits a GPU reset.", labels=["gpu"]
        )
        failure = GaugeMetricFamily(
            "stalwart_gpu_row_remap_failure", "1 if row remapping failed.", labels=["gpu"]
        )
        rec = GaugeMetricFamily(
            "stalwart_gpu_recovery_action", "NVML recovery action (0: none).", labels=["gpu"]
        )
        thr = GaugeMetricFamily(
            "stalwart_gpu_clock_event_active",
            "1 while a throttle reason is active.",
            labels=["gpu", "reason"],
        )
        temp = GaugeMetricFamily("stalwart_gpu_temperature_celsius", "GPU temperature.", labels=["gpu"])
        power = GaugeMetricFamily("stalwart_gpu_power_watts", "GPU power draw.", labels=["gpu"])
        healthy = GaugeMetricFamily(
            "stalwart_gpu_healthy", "0 after a fault that needs a restart or a new node.", labels=["gpu"]
        )
        for g in m._gpus:
            i = str(g.index)
            healthy.add_metric([i], 1 if g.healthy else 0)
            for x, n in g.xids.items():
                xid.add_metric([i, str(x)], n)
            for t, n in g.ecc.items():
                ecc.add_metric([i, t], n)
            if g.remap is not None:
                remap.add_metric([i, "correctable"], g.remap[0])
                remap.add_metric([i, "uncorrectable"], g.remap[1])
                pending.add_metric([i], 1 if g.remap[2] else 0)
                failure.add_metric([i], 1 if g.remap[3] else 0)
            if g.recovery is not None:
                rec.add_metric([i], g.recovery)
            for reason, n in g.throttle.items():
                thr.add_metric([i, reason], 1 if n else 0)
            if g.temperature is not None:
                temp.add_metric([i], g.temperature)
            if g.power_w is not None:
                power.add_metric([i], g.power_w)
        yield from (xid, ecc, remap, pending, failure, rec, thr, temp, power, healthy)
