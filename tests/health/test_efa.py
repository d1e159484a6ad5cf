"""EFA counters from a fake sysfs tree laid out like /sys/class/infiniband."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from stalwart.health.api import Action, FaultKind
from stalwart.health.efa import EfaMonitor

from .clock import Clock, context


def _port(root: Path, dev: str, driver: str = "efa", state: str = "4: ACTIVE", **counters: int) -> Path:
    port = root / "class" / "infiniband" / dev / "ports" / "1"
    (port / "hw_counters").mkdir(parents=True)
    (port / "state").write_text(state + "\n")
    for name, value in {
        "retrans_timeout_events": 0,
        "rdma_read_wr_err": 0,
        "tx_bytes": 10,
        **counters,
    }.items():
        (port / "hw_counters" / name).write_text(f"{value}\n")
    drivers = root / "bus" / "drivers" / driver
    drivers.mkdir(parents=True, exist_ok=True)
    (root / "class" / "infiniband" / dev / "device").mkdir()
    (root / "class" / "infiniband" / dev / "device" / "driver").symlink_to(drivers)
    return port


def test_rising_error_counters_warn_and_a_down_port_replaces_the_node(tmp_path: Path) -> None:
    port = _port(tmp_path, "rdmap0s31")
    _port(tmp_path, "mlx5_0", driver="mlx5_core")  # not EFA: ignored
    clock = Clock()
    m = EfaMonitor(sys_root=str(tmp_path), check_interval=1.0)
    m.start(context(clock))
    assert m.disabled is None and [p.device for p in m._ports or []] == ["rdmap0s31"]
    assert m.poll(clock()) == []  # first read: the baseline
    (port / "hw_counters" / "retrans_timeout_events").write_text("7\n")
    (port / "hw_counters" / "tx_bytes").write_text("99999\n")  # traffic is not an error
    clock.advance(1)
    [f] = m.poll(clock())
    assert f.kind is FaultKind.EFA and f.action is Action.WARN
    assert f.evidence["counters"] == {"retrans_timeout_events": {"before": 0, "now": 7}}
    (port / "state").write_text("1: DOWN\n")
    clock.advance(1)
    assert m.poll(clock()) == []  # one DOWN read may be a flap
    clock.advance(1)
    [f] = m.poll(clock())
    assert f.action is Action.REPLACE_NODE and "DOWN" in f.message
    text = generate_latest(m.metrics.registry if m.metrics else None).decode()  # type: ignore[arg-type]
    assert 'stalwart_efa_port_active{device="rdmap0s31",port="1"} 0.0' in text
    assert (
        'stalwart_efa_errors_total{counter="retrans_timeout_events",device="rdmap0s31",port="1"} 7.0' in text
    )


def test_without_efa_devices_the_monitor_is_off(tmp_path: Path) -> None:
    clock = Clock()
    m = EfaMonitor(sys_root=str(tmp_path))
    m.start(context(clock))
    assert m.disabled and "no EFA devices" in m.disabled
    assert m.poll(clock()) == []


def test_an_unreadable_counter_is_skipped(tmp_path: Path) -> None:
    port = _port(tmp_path, "rdmap1s31")
    (port / "hw_counters" / "rdma_read_wr_err").unlink()
    (port / "hw_counters" / "rdma_read_wr_err").mkdir()  # reading a directory fails
    clock = Clock()
    m = EfaMonitor(sys_root=str(tmp_path), check_interval=1.0)
    m.start(context(clock))
    assert m.poll(clock()) == []
    clock.advance(1)
    assert m.poll(clock()) == []
