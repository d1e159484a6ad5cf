"""The agent's status endpoint: ``/status`` (JSON) and ``/metrics`` (Prometheus), from a thread."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["AgentMetrics", "StatusServer"]

logger = logging.getLogger(__name__)


class AgentMetrics:
    """The agent's Prometheus metrics, registered in ``registry`` (monitors share it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.restarts = Counter(
            "stalwart_restarts", "Worker restarts by this agent, by reason.", ["reason"], registry=registry
        )
        self.workers = Gauge("stalwart_workers", "Local workers by state.", ["state"], registry=registry)
        self.recovery = Histogram(
            "stalwart_recovery_seconds",
            "Seconds from a fault to the first step of the next generation.",
            buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300),
            registry=registry,
        )
        self.recovery_phase = Histogram(
            "stalwart_recovery_phase_seconds",
            "Seconds each recovery phase took on this node (detect, stop, rendezvous, spawn, first_step).",
            ["phase"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=registry,
        )
        self.generation = Gauge("stalwart_generation", "Job-wide restart generation.", registry=registry)
        self.checkpoint_events = Counter(
            "stalwart_checkpoint_events",
            "Checkpoint events this node's workers reported: saved (committed; rank 0 reports it), "
            "failed (a save that did not persist), mirror_failed, corrupt (a checkpoint skipped on "
            "load), loaded (local rank 0 reports it).",
            ["event"],
            registry=registry,
        )
        self.checkpoint_step = Gauge(
            "stalwart_checkpoint_step",
            "Step of the last checkpoint this node's workers saved (committed) or loaded.",
            ["event"],
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "stalwart_checkpoint_seconds",
            "Seconds from save() to the commit (saved), or of load_latest (loaded), as workers reported.",
            ["event"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=registry,
        )

    def observe_checkpoint(self, event: str, fields: dict[str, Any]) -> None:
        """Count a worker's ``checkpoint_*`` event (others are ignored here)."""
        kind = _CHECKPOINT_EVENTS.get(event)
        if kind is None:
            return
        self.checkpoint_events.labels(event=kind).inc()
        if kind in ("saved", "loaded"):
            if isinstance(fields.get("step"), int):
                self.checkpoint_step.labels(event=kind).set(fields["step"])
            if isinstance(fields.get("seconds"), int | float):
                self.checkpoint_seconds.labels(event=kind).observe(max(0.0, float(fields["seconds"])))


_CHECKPOINT_EVENTS = {
    "checkpoint_saved": "saved",
    "checkpoint_failed": "failed",
    "checkpoint_mirror_failed": "mirror_failed",
    "checkpoint_corrupt": "corrupt",
    "checkpoint_loaded": "loaded",
}


class StatusServer:
    """Serves ``snapshot()`` as ``/status`` and ``registry`` as ``/metrics`` on ``host:port``.

    ``port=0`` picks a free port; ``address`` gives the bound one after ``start()``.
    """

    def __init__(
        self, host: str, port: int, snapshot: Callable[[], dict[str, Any]], registry: CollectorRegistry
    ) -> None:
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/status":
                    body = json.dumps(outer._snapshot(), default=str).encode()
                    ctype = "application/json"
                elif path == "/metrics":
                    body = generate_latest(outer._registry)
                    ctype = CONTENT_TYPE_LATEST
                else:
                    self.send_error(404, "try /status or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("status: " + format, *args)

        self._snapshot = snapshot
        self._registry = registry
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="stalwart-status", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
