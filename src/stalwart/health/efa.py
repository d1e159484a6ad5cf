"""EFA health from sysfs: error counters and port state under ``<sys_root>/class/infiniband``.

Devices are those whose driver is ``efa`` (or, where the driver link is missing, whose name starts
with ``rdmap`` or ``efa``). Every ``check_interval`` seconds the monitor reads each port's
``state`` and the error counters in ``hw_counters``: a rise of any of them warns (SRD retransmit
timeouts, unresponsive or impaired remotes, RDMA work-request errors); a port that is not ACTIVE
on two reads in a row recommends replacing the node. Without EFA devices the monitor says so once
and is off; an unreadable file is logged once and skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stalwart.health.api import Action, Fault, FaultKind, MonitorContext
from stalwart.health.base import MonitorBase

__all__ = ["ERROR_COUNTERS", "EfaMonitor"]

logger = logging.getLogger(__name__)

ERROR_COUNTERS = (
    "retrans_timeout_events",
    "unresponsive_remote_events",
    "impaired_remote_conn_events",
    "rdma_read_wr_err",
    "rdma_write_wr_err",
    "rx_drops",
)


@dataclass
class _Port:
    device: str
    port: str
    path: str
    counters: dict[str, int] = field(default_factory=dict)
    active: bool = True
    down_reads: int = 0


class EfaMonitor(MonitorBase):
    """Emits ``EFA`` faults from sysfs counters (``sys_root`` is injectable for tests)."""

    name = "efa"
    keep_pending_across_starts = True

    def __init__(self, sys_root: str = "/sys", check_interval: float = 10.0) -> None:
        super().__init__()
        if check_interval <= 0:
            raise ValueError(f"EFA check interval must be > 0, got {check_interval}")
        self.sys_root = sys_root
        self.check_interval = check_interval
        self.disabled: str | None = None
        self._ports: list[_Port] | None = None
        self._last = float("-inf")
        self._unreadable: set[str] = set()
        self._registries: set[int] = set()

    def _on_start(self, ctx: MonitorContext) -> None:
        if self._ports is None:
            self._ports = self._discover()
            if not self._ports:
                self.disabled = (
                    f"no EFA devices under {self.sys_root}/class/infiniband; EFA monitoring is off"
                )
                logger.info("%s", self.disabled)
        if self.metrics is not None and id(self.metrics.registry) not in self._registries:
            self._registries.add(id(self.metrics.registry))
            self.metrics.registry.register(_EfaCollector(self))

    def _discover(self) -> list[_Port]:
        base = os.path.join(self.sys_root, "class", "infiniband")
        try:
            devices = sorted(os.listdir(base))
        except OSError:
            return []
        ports = []
        for dev in devices:
            driver = os.path.join(base, dev, "device", "driver")
            is_efa = os.path.basename(os.path.realpath(driver)) == "efa" if os.path.exists(driver) else None
            if is_efa is False or (is_efa is None and not dev.startswith(("rdmap", "efa"))):
                continue
            try:
                names = sorted(os.listdir(os.path.join(base, dev, "ports")))
            except OSError:
                continue
            ports += [_Port(dev, p, os.path.join(base, dev, "ports", p)) for p in names]
        return ports

    def _read(self, path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            if path not in self._unreadable:
                self._unreadable.add(path)
                logger.warning("EFA: cannot read %s (%s); skipping it", path, exc)
            return None

    def _check(self, now: float) -> None:
        if self.disabled is not None or not self._ports or now - self._last < self.check_interval:
            return
        self._last = now
        for port in self._ports:
            self._check_port(port, now)

    def _check_port(self, port: _Port, now: float) -> None:
        state = self._read(os.path.join(port.path, "state"))
        if state is not None:
            port.active = "ACTIVE" in state.upper()
            port.down_reads = 0 if port.active else port.down_reads + 1
            if port.down_reads == 2:
                self._fault(port, Action.REPLACE_NODE, f"port state is {state!r}", {"state": state}, now)
        rises: dict[str, Any] = {}
        for name in ERROR_COUNTERS:
            raw = (
                self._read(os.path.join(port.path, "hw_counters", name))
                if os.path.exists(os.path.join(port.path, "hw_counters", name))
                else None
            )
            if raw is None:
                continue
            try:
                value = int(raw)
            except ValueError:
                continue
            before = port.counters.get(name)
            port.counters[name] = value
            if before is not None and value > before:
                rises[name] = {"before": before, "now": value}
        if rises:
            names = ", ".join(rises)
            self._fault(port, Action.WARN, f"error counters rose: {names}", {"counters": rises}, now)

    def _fault(self, port: _Port, action: Action, message: str, evidence: dict[str, Any], now: float) -> None:
        self._emit(
            Fault(
                kind=FaultKind.EFA,
                action=action,
                message=f"EFA {port.device} port {port.port}: {message}",
                evidence={"device": port.device, "port": port.port, **evidence},
                node=self._node(),
                source=self.name,
                observed_at=now,
            )
        )


class _EfaCollector(Collector):
    def __init__(self, monitor: EfaMonitor) -> None:
        self.m = monitor

    def collect(self) -> Any:
        counters = CounterMetricFamily(
            "stalwart_efa_errors", "EFA error counters (from sysfs).", labels=["device", "port", "counter"]
        )
        active = GaugeMetricFamily(
            "stalwart_efa_port_active", "1 if the EFA port is ACTIVE.", labels=["device", "port"]
        )
        for p in self.m._ports or []:
            active.add_metric([p.device, p.port], 1 if p.active else 0)
            for name, value in p.counters.items():
                counters.add_metric([p.device, p.port, name], value)
        yield counters
        yield active
