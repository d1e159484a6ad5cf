"""The in-worker API: ``report(step, loss=...)`` and fault injection (``STALWART_FAULT``)."""

from stalwart.worker.report import report

__all__ = ["report"]
