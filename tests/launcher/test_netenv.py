"""NCCL/EFA environment: detection from a fake sysfs tree, defaults, and the user's values kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from efa_sysfs import make_sysfs

from stalwart.launcher.netenv import (
    configure_network_env,
    detect_efa_devices,
    instance_type,
    plan_network_env,
)

ALWAYS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_FR_BUFFER_SIZE": "2000",  # this machine's torch (2.13) reads the new name
}


def test_p5_with_efa_gets_efa_rdma_and_socket_defaults(tmp_path: Path) -> None:
    root = make_sysfs(
        tmp_path,
        efa={"rdmap16s27": "0xefa2", "rdmap32s27": "0xefa2"},
        interfaces=("lo", "ens32", "docker0", "veth1a2b"),
        product="p5.48xlarge",
    )
    env: dict[str, str] = {}
    effective = configure_network_env(env, sys_root=root)
    assert env == effective
    assert effective == {
        "FI_PROVIDER": "efa",
        "FI_EFA_USE_DEVICE_RDMA": "1",
        "FI_EFA_FORK_SAFE": "1",
        "NCCL_SOCKET_IFNAME": "^lo,docker,veth",
        **ALWAYS,
    }


def test_efa_gen1_has_no_rdma_read(tmp_path: Path) -> None:
    root = make_sysfs(tmp_path, efa={"rdmap0s6": "0xefa0"}, interfaces=("lo", "eth0"), product="c5n.18xlarge")
    env: dict[str, str] = {}
    configure_network_env(env, sys_root=root)
    assert env["FI_PROVIDER"] == "efa"
    assert "FI_EFA_USE_DEVICE_RDMA" not in env


@pytest.mark.parametrize(("product", "rdma"), [("p4d.24xlarge", True), ("g5.48xlarge", False), (None, False)])
def test_without_a_pci_id_the_instance_family_decides_rdma(
    tmp_path: Path, product: str | None, rdma: bool
) -> None:
    root = make_sysfs(tmp_path, efa={"rdmap1s1": None}, product=product)
    env: dict[str, str] = {}
    configure_network_env(env, sys_root=root)
    assert ("FI_EFA_USE_DEVICE_RDMA" in env) is rdma


def test_machine_without_efa_gets_only_the_torch_defaults(tmp_path: Path) -> None:
    # a Mellanox device is RDMA but not EFA; only loopback: NCCL must choose the interface itself
    root = make_sysfs(tmp_path, other_ib=("mlx5_0",), interfaces=("lo",))
    assert detect_efa_devices(root) == []
    env: dict[str, str] = {"PATH": "/bin"}
    assert configure_network_env(env, sys_root=root) == ALWAYS
    assert env == {"PATH": "/bin", **ALWAYS}


def test_empty_root_is_a_machine_without_sysfs(tmp_path: Path) -> None:
    assert detect_efa_devices(str(tmp_path)) == []
    assert instance_type(str(tmp_path)) is None
    assert configure_network_env({}, sys_root=str(tmp_path)) == ALWAYS


def test_user_values_are_never_overridden(tmp_path: Path) -> None:
    root = make_sysfs(
        tmp_path, efa={"rdmap16s27": "0xefa1"}, interfaces=("lo", "ens5"), product="p4d.24xlarge"
    )
    user = {
        "FI_PROVIDER": "tcp",
        "FI_EFA_USE_DEVICE_RDMA": "0",
        "NCCL_SOCKET_IFNAME": "ens5",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_FR_BUFFER_SIZE": "0",
    }
    env = dict(user)
    effective = configure_network_env(env, sys_root=root)
    for k, v in user.items():
        assert env[k] == v and effective[k] == v
    assert env["FI_EFA_FORK_SAFE"] == "1"
    sources = {s.name: s.source for s in plan_network_env(user, root)}
    assert {k for k, v in sources.items() if v == "user"} == set(user)


def test_the_old_name_of_async_error_handling_set_by_the_user_is_kept(tmp_path: Path) -> None:
    # torch reads TORCH_NCCL_ASYNC_ERROR_HANDLING first: setting it overrode the user's old spelling
    env = {"NCCL_ASYNC_ERROR_HANDLING": "0"}
    configure_network_env(env, sys_root=make_sysfs(tmp_path))
    assert env == {**env, "NCCL_ASYNC_ERROR_HANDLING": "0"} and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env


def test_efa_detected_by_driver_even_without_rdmap_name(tmp_path: Path) -> None:
    root = make_sysfs(tmp_path, efa={"efa_0": "0xefa3"})
    devs = detect_efa_devices(root)
    assert [(d.name, d.driver, d.pci_device, d.rdma_read) for d in devs] == [("efa_0", "efa", "0xefa3", True)]


def test_plan_covers_every_managed_variable_with_a_reason(tmp_path: Path) -> None:
    plan = plan_network_env({}, make_sysfs(tmp_path))
    assert len(plan) == 7 and len({s.name for s in plan}) == 7
    assert all(s.reason for s in plan)
    assert {s.name for s in plan if s.source == "unset"} == {
        "FI_PROVIDER",
        "FI_EFA_USE_DEVICE_RDMA",
        "FI_EFA_FORK_SAFE",
        "NCCL_SOCKET_IFNAME",
    }


def test_old_torch_gets_the_old_flight_recorder_variable(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    configure_network_env(env, sys_root=make_sysfs(tmp_path), torch_version="2.6.0+cu124")
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000" and "TORCH_FR_BUFFER_SIZE" not in env


@pytest.mark.parametrize("name", ["TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"])
def test_either_flight_recorder_name_set_by_the_user_is_kept(tmp_path: Path, name: str) -> None:
    env = {name: "500"}
    effective = configure_network_env(env, sys_root=make_sysfs(tmp_path))
    assert env == {name: "500", **{k: v for k, v in ALWAYS.items() if k != "TORCH_FR_BUFFER_SIZE"}}
    assert effective[name] == "500"
