"""Health monitors: crashes, hangs, bad loss, stragglers, log rules and GPU health."""

from stalwart.health.api import Action, Fault, FaultKind, Monitor, MonitorContext

__all__ = ["Action", "Fault", "FaultKind", "Monitor", "MonitorContext"]
