"""The in-worker API: ``report(step, loss=...)`` and fault injection (``STALWART_FAULT``)."""

from stalwart.worker.report import busy, report

__all__ = ["busy", "report"]
