"""The local node supervisor (``stalwart.job.node``): replacements and stop signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stalwart.job import node

# exits 75 (hand the node over) on its first run; the replacement runs until it is stopped
AGENT = """
import os, sys, time
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(75)
time.sleep(30)
"""


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_stop_signal_while_the_replacement_starts_stops_the_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None
) -> None:
    started: list[subprocess.Popen[bytes]] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(*args, **kwargs)
        started.append(child)
        if len(started) == 2:  # SIGTERM while the supervisor is starting the replacement
            os.kill(os.getpid(), signal.SIGTERM)
        return child

    monkeypatch.setattr(node, "subprocess", types.SimpleNamespace(Popen=popen, DEVNULL=subprocess.DEVNULL))
    monkeypatch.setattr(node, "_stopping", [])
    monkeypatch.setattr(node, "_child", None)
    argv = [sys.executable, "-c", AGENT, str(tmp_path / "first-run-done")]
    try:
        assert node._supervise(str(tmp_path), argv, replacements=3) == 1
    finally:
        for child in started:
            if child.poll() is None:
                child.kill()
                child.wait()
    record = json.loads((tmp_path / node.EXIT_FILE).read_text())
    # the replacement got the signal (it did not train on unsupervised), and no third agent started
    assert record["returncode"] == -signal.SIGTERM and record["replacements"] == 1
    assert len(started) == 2


def test_a_stop_signal_before_any_agent_starts_starts_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None
) -> None:
    monkeypatch.setattr(node, "_stopping", [int(signal.SIGTERM)])
    monkeypatch.setattr(node, "_child", None)
    marker = tmp_path / "first-run-done"
    assert node._supervise(str(tmp_path), [sys.executable, "-c", AGENT, str(marker)], replacements=3) == 1
    assert not marker.exists()
    assert json.loads((tmp_path / node.EXIT_FILE).read_text())["returncode"] == -signal.SIGTERM
