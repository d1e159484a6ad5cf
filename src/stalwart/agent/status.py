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
