"""The in-worker API: ``report(step, loss=...)``, ``busy``, ``event`` and fault injection
(``STALWART_FAULT``)."""

from stalwart.worker.report import busy, event, report

__all__ = ["busy", "event", "report"]
