"""``report()`` over the real report channel: what a worker sends is what the agent decodes."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stalwart.errors import ConfigError
from stalwart.worker.api import METRIC_BUSY, METRIC_EXITING, Report
from stalwart.worker.channel import ReportReceiver
from stalwart.worker.faults import parse_faults

SCRIPT = """
import sys
from stalwart.worker import busy, report
assert report(1, loss=2.5) == 2.5
report(2, loss=float("nan"), grad_norm=float("inf"), tokens=1024)
report(3)
report(4, loss=1.0)
report(4, loss=1.0)
busy(30)
print("done", flush=True)
"""


def _receive(tmp_path: Path, env: dict[str, str], n: int) -> list[Report]:
    got: list[Report] = []
    arrived = threading.Event()

    def on_report(r: Report) -> None:
        got.append(r)
        if len(got) >= n:
            arrived.set()

    rx = ReportReceiver(str(tmp_path / "r.sock"), on_report)
    rx.start()
    try:
        full = dict(
            os.environ,
            STALWART_REPORT_SOCKET=rx.path,
            RANK="3",
            LOCAL_RANK="1",
            STALWART_GENERATION="2",
            **env,
        )
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert arrived.wait(10), f"only {len(got)} reports arrived"
    finally:
        rx.stop()
    return got


def test_reports_arrive_with_rank_generation_loss_and_metrics(tmp_path: Path) -> None:
    got = _receive(tmp_path, {}, 7)
    assert [r.step for r in got] == [1, 2, 3, 4, 4, 4, 4]
    assert got[5].metrics == {METRIC_BUSY: 30.0} and got[5].loss is None
    assert got[6].metrics == {METRIC_EXITING: 1.0}  # sent from atexit
    first, nan = got[0], got[1]
    assert (first.rank, first.local_rank, first.generation, first.loss) == (3, 1, 2, 2.5)
    assert first.pid != os.getpid() and abs(first.time - time.time()) < 60
    assert nan.loss is not None and math.isnan(nan.loss)
    assert math.isinf(nan.metrics["grad_norm"]) and nan.metrics["tokens"] == 1024.0
    assert got[2].loss is None and got[2].metrics == {}


def test_an_injected_nan_replaces_the_loss_the_script_sees(tmp_path: Path) -> None:
    got = _receive(tmp_path, {"STALWART_FAULT": "nan:rank=3:step=4:once=false"}, 7)
    assert not math.isnan(got[0].loss or 0.0)
    assert got[3].loss is not None and math.isnan(got[3].loss)


def test_report_without_an_agent_is_a_no_op() -> None:
    env = {k: v for k, v in os.environ.items() if k != "STALWART_REPORT_SOCKET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "done" in out.stdout


def test_receiver_survives_malformed_datagrams(tmp_path: Path) -> None:
    got: list[Report] = []
    rx = ReportReceiver(str(tmp_path / "r.sock"), got.append)
    rx.start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"not json", rx.path)
        s.sendto(b'{"rank": 1}', rx.path)
        s.sendto(Report(rank=0, local_rank=0, step=7, time=1.0, pid=1).encode(), rx.path)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        s.close()
    finally:
        rx.stop()
    assert [r.step for r in got] == [7]


def test_report_never_blocks_when_the_agent_does_not_read(tmp_path: Path) -> None:
    # A bound socket nobody reads: its buffer fills and further reports are dropped, not waited on.
    path = str(tmp_path / "full.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    code = "from stalwart.worker import report\nfor i in range(20000): report(i, loss=1.0)\nprint('ok')\n"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, STALWART_REPORT_SOCKET=path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
        assert len(sink.recv(65536)) > 0  # the first reports did arrive
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("explode:rank=1", "unknown kind 'explode'"),
        ("crash:rank", "'rank' is not key=value"),
        ("crash:rank=x", "bad value for 'rank'"),
        ("slow:factor=0.5", "factor must be > 1"),
        ("crash:when=3", "unknown key 'when'"),
    ],
)
def test_bad_fault_specs_name_the_part(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_faults(spec)


def test_fault_specs_parse() -> None:
    [crash, slow] = parse_faults("crash:rank=1:step=20:signal=term, slow:rank=2:factor=3")
    assert (crash.kind, crash.rank, crash.step, crash.signal) == ("crash", 1, 20, 15)
    assert (slow.kind, slow.factor, slow.once) == ("slow", 3.0, True)
    # the README's own spelling (SIGSIGSEGV before), and the number
    assert [f.signal for f in parse_faults("crash:signal=SIGSEGV,crash:signal=segv,crash:signal=11")] == [
        11
    ] * 3


def test_a_fault_fires_once_per_job_even_where_another_job_left_its_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stalwart.worker import faults

    monkeypatch.setenv("STALWART_FAULT_MARKER_DIR", str(tmp_path))  # a reused --log-dir
    fired = []
    for job in ("job-1", "job-1", "job-2"):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        [spec] = parse_faults("nan:rank=0:step=1")
        fired.append(faults._claim(spec))
    assert fired == [True, False, True]  # once per job, and the second job still gets its fault
