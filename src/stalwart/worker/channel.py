"""The agent side of the report channel: a Unix datagram socket and a reader thread."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from stalwart.worker.api import Report

__all__ = ["ReportReceiver"]

logger = logging.getLogger(__name__)


class ReportReceiver:
    """Binds ``path`` and calls ``on_report`` for each decoded ``Report``, from its own thread.

    Malformed datagrams are logged once and dropped; they never stop the receiver.
    """

    def __init__(self, path: str, on_report: Callable[[Report], None]) -> None:
        self.path = path
        self._on_report = on_report
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._warned = False

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(self.path)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="stalwart-reports", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            try:
                rep = Report.decode(data)
            except (ValueError, TypeError) as exc:
                if not self._warned:
                    logger.warning("dropping malformed worker report (%s): %r", exc, data[:200])
                    self._warned = True
                continue
            try:
                self._on_report(rep)
            except Exception:
                logger.exception("report handler failed")

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
