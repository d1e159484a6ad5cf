"""``stalwart doctor``: runs as a command, its JSON parses, and each known-bad combination warns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from efa_sysfs import make_sysfs

from stalwart.launcher.doctor import collect, gpu_inventory


def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stalwart.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_doctor_json_reports_the_node_and_the_plan(tmp_path: Path) -> None:
    root = make_sysfs(
        tmp_path, efa={"rdmap16s27": "0xefa2"}, interfaces=("lo", "ens32"), product="p5.48xlarge"
    )
    out = _doctor("--json", "--sys-root", root, env={"CUDA_LAUNCH_BLOCKING": "1", "FI_PROVIDER": "efa"})
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["instance_type"] == "p5.48xlarge"
    assert rep["efa"] == [{"name": "rdmap16s27", "driver": "efa", "pci_device": "0xefa2"}]
    assert rep["efa_rdma_read"] is True
    assert rep["versions"]["torch"].startswith("2.")
    assert rep["gpus"] == [] and rep["gpu_note"].startswith("no NVML")
    by_name = {v["name"]: v for v in rep["variables"]}
    assert by_name["FI_PROVIDER"]["source"] == "user"
    assert by_name["FI_EFA_USE_DEVICE_RDMA"] == {
        "name": "FI_EFA_USE_DEVICE_RDMA",
        "value": "1",
        "source": "stalwart",
        "reason": "EFA supports RDMA read",
    }
    assert rep["other_variables"]["CUDA_LAUNCH_BLOCKING"] == "1"
    warnings = " ".join(rep["warnings"])
    assert "CUDA_LAUNCH_BLOCKING=1" in warnings
    assert "aws-ofi-nccl" in warnings  # EFA without the plugin


def test_doctor_tables_and_strict_exit(tmp_path: Path) -> None:
    root = make_sysfs(tmp_path)
    out = _doctor("--sys-root", root, "--strict", env={"FI_PROVIDER": "efa"})
    assert out.returncode == 1
    for text in (
        "GPUs",
        "EFA devices",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "FI_PROVIDER=efa but this node has no EFA",
    ):
        assert text in out.stdout


def _warnings(tmp_path: Path, env: dict[str, str], **sys: object) -> str:
    return " | ".join(collect(env, sys_root=make_sysfs(tmp_path, **sys)).warnings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}, "TORCH_NCCL_ASYNC_ERROR_HANDLING=0"),
        ({"NCCL_ASYNC_ERROR_HANDLING": "0"}, "NCCL_ASYNC_ERROR_HANDLING=0"),  # kept: the user set it
        ({"TORCH_NCCL_BLOCKING_WAIT": "1"}, "TORCH_NCCL_BLOCKING_WAIT=1"),
        ({"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}, "dumps will be empty"),
        ({"TORCH_FR_BUFFER_SIZE": "0"}, "TORCH_FR_BUFFER_SIZE=0: flight-recorder dumps will be empty"),
        ({"FI_PROVIDER": "efa"}, "no EFA device"),
        ({"CUDA_LAUNCH_BLOCKING": "1"}, "CUDA_LAUNCH_BLOCKING=1"),
        ({}, None),
    ],
)
def test_known_bad_combinations_without_efa(
    tmp_path: Path, env: dict[str, str], expected: str | None
) -> None:
    got = _warnings(tmp_path, env)
    if expected is None:
        assert got == ""
    else:
        assert expected in got


def test_efa_specific_warnings(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    got = _warnings(
        tmp_path / "a", {"FI_PROVIDER": "tcp", "FI_EFA_USE_DEVICE_RDMA": "1"}, efa={"rdmap0s6": "0xefa0"}
    )
    assert "NCCL will not use EFA" in got
    assert "lack RDMA read" in got
    # with the plugin installed, the fallback-to-sockets warning goes away and its version is read
    (tmp_path / "b").mkdir()
    lib = tmp_path / "b/opt/amazon/ofi-nccl/lib"
    lib.mkdir(parents=True)
    (lib / "libnccl-net.so").write_bytes(b"\x7fELF...\x00NET/OFI aws-ofi-nccl v1.13.2-aws\x00")
    rep = collect({}, sys_root=make_sysfs(tmp_path / "b", efa={"rdmap0s6": "0xefa2"}))
    assert rep.versions["aws_ofi_nccl"] == "1.13.2"
    assert rep.warnings == []


class _FakeNvml:
    """The part of pynvml's interface doctor uses: two H100s on a CUDA 12.2 driver."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str:
        return "535.104.05"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12020

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * 2**30)


def test_gpus_through_an_nvml_interface(tmp_path: Path) -> None:
    gpus, note, cuda_driver = gpu_inventory(_FakeNvml())
    assert [g["name"] for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert cuda_driver == "12.2" and "535.104.05" in note
    rep = collect({}, sys_root=make_sysfs(tmp_path), nvml=_FakeNvml())
    # this machine's torch is a CPU build: with GPUs present that is a known-bad combination
    assert any("CPU build" in w for w in rep.warnings)
