"""NCCL/EFA environment set-up for workers.

``configure_network_env(environ)`` fills in the variables a training job on AWS EFA (or any NCCL
job) usually needs, never overriding one the user set, and returns the effective values so that
``stalwart run`` prints them at start. Everything it reads from the machine goes through
``sys_root`` (default ``/``) so that tests can point it at a fake sysfs tree.

What it sets, and when:

================================ ========= ==============================================
``FI_PROVIDER``                  ``efa``   EFA devices present
``FI_EFA_USE_DEVICE_RDMA``       ``1``     EFA with RDMA read (EFA gen2+: p4d, p5, trn1...)
``FI_EFA_FORK_SAFE``             ``1``     EFA present (dataloader workers fork)
``NCCL_SOCKET_IFNAME``           ``^lo,docker,veth`` a non-virtual interface exists
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` ``3``  always: a failed/timed-out collective ends the process
``TORCH_NCCL_DUMP_ON_TIMEOUT``   ``1``     always: the flight recorder dumps on a timeout
``TORCH_FR_BUFFER_SIZE``         ``2000``  always: the flight recorder keeps the last 2000 ops
================================ ========= ==============================================

torch before 2.8 reads the flight-recorder size from ``TORCH_NCCL_TRACE_BUFFER_SIZE``; later
versions read ``TORCH_FR_BUFFER_SIZE`` and warn about the old name. We set the one the installed
torch reads (found without importing torch) and respect either when the user set it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "EfaDevice",
    "EnvSetting",
    "configure_network_env",
    "detect_efa_devices",
    "flight_recorder_buffer_var",
    "instance_type",
    "plan_network_env",
    "supports_rdma_read",
]

SOCKET_IFNAME_DEFAULT = "^lo,docker,veth"
_VIRTUAL_IF_PREFIXES = ("lo", "docker", "veth", "virbr", "br-", "cni", "flannel", "cali", "tun", "tap")

# PCI device ids of the EFA generations (vendor 0x1d0f, Amazon). Generation 1 (0xefa0: p3dn, c5n...)
# has no RDMA read; libfabric then needs FI_EFA_USE_DEVICE_RDMA unset or 0.
_EFA_NO_RDMA_READ = {"0xefa0"}
# Instance families whose EFA supports RDMA read, for when the PCI id cannot be read.
_RDMA_FAMILIES = ("p4d", "p4de", "p5", "p5e", "p5en", "p6", "p6e", "trn1", "trn1n", "trn2", "trn2u")

ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
FR_BUFFER_NAMES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
_FR_BUFFER = "<flight-recorder buffer>"  # stands for whichever of FR_BUFFER_NAMES applies
_MANAGED = (
    "FI_PROVIDER",
    "FI_EFA_USE_DEVICE_RDMA",
    "FI_EFA_FORK_SAFE",
    "NCCL_SOCKET_IFNAME",
    ASYNC_ERROR_HANDLING,
    "TORCH_NCCL_DUMP_ON_TIMEOUT",
    _FR_BUFFER,
)


@dataclass(frozen=True, slots=True)
class EfaDevice:
    """One EFA device from ``/sys/class/infiniband``; ``pci_device`` is e.g. ``0xefa1`` or None."""

    name: str
    driver: str | None
    pci_device: str | None

    @property
    def rdma_read(self) -> bool | None:
        """True/False from the PCI id; None when the id is unknown."""
        if self.pci_device is None:
            return None
        return self.pci_device not in _EFA_NO_RDMA_READ


@dataclass(frozen=True, slots=True)
class EnvSetting:
    """A managed variable: its effective value (None: left unset), who chose it, and why."""

    name: str
    value: str | None
    source: str  # "user", "stalwart" or "unset"
    reason: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def detect_efa_devices(sys_root: str = "/") -> list[EfaDevice]:
    """EFA devices: ``/sys/class/infiniband/*`` bound to the ``efa`` driver, or named ``rdmap*``."""
    base = Path(sys_root, "sys/class/infiniband")
    if not base.is_dir():
        return []
    found = []
    for dev in sorted(base.iterdir()):
        driver_link = dev / "device" / "driver"
        driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
        if driver != "efa" and not (driver is None and dev.name.startswith("rdmap")):
            continue
        found.append(EfaDevice(dev.name, driver, _read(dev / "device" / "device")))
    return found


def instance_type(sys_root: str = "/") -> str | None:
    """The EC2 instance type (``p5.48xlarge``) from DMI, or None off EC2 / when unreadable."""
    name = _read(Path(sys_root, "sys/devices/virtual/dmi/id/product_name"))
    if name and re.fullmatch(r"[a-z][a-z0-9-]*\.[a-z0-9-]+", name):
        return name
    return None


def supports_rdma_read(devices: list[EfaDevice], itype: str | None) -> bool:
    """Whether to turn on ``FI_EFA_USE_DEVICE_RDMA``: every device's PCI id says so, or, when
    the ids are unknown, the instance family is one known to have it."""
    if not devices:
        return False
    known = [d.rdma_read for d in devices if d.rdma_read is not None]
    if known:
        return all(known)
    return itype is not None and itype.split(".", 1)[0] in _RDMA_FAMILIES


def _has_real_interface(sys_root: str) -> bool:
    net = Path(sys_root, "sys/class/net")
    if not net.is_dir():
        return False
    return any(not p.name.startswith(_VIRTUAL_IF_PREFIXES) for p in net.iterdir())


def _installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def flight_recorder_buffer_var(torch_version: str | None) -> str:
    """The flight-recorder size variable that ``torch_version`` reads (the new name when unknown)."""
    m = re.match(r"(\d+)\.(\d+)", torch_version or "")
    if m and (int(m.group(1)), int(m.group(2))) < (2, 8):
        return "TORCH_NCCL_TRACE_BUFFER_SIZE"
    return "TORCH_FR_BUFFER_SIZE"


def plan_network_env(
    environ: Mapping[str, str], sys_root: str = "/", torch_version: str | None = None
) -> list[EnvSetting]:
    """What ``configure_network_env`` would do, without doing it (``stalwart doctor`` shows this).

    ``torch_version`` defaults to the installed torch's (read from its package metadata).
    """
    devices = detect_efa_devices(sys_root)
    rdma = supports_rdma_read(devices, instance_type(sys_root))
    n = len(devices)
    wanted: dict[str, tuple[str | None, str]] = {
        "FI_PROVIDER": ("efa", f"{n} EFA device(s)") if n else (None, "no EFA devices"),
        "FI_EFA_USE_DEVICE_RDMA": ("1", "EFA supports RDMA read")
        if rdma
        else (None, "no EFA RDMA read" if n else "no EFA devices"),
        "FI_EFA_FORK_SAFE": ("1", "EFA present; forked dataloaders") if n else (None, "no EFA devices"),
        "NCCL_SOCKET_IFNAME": (SOCKET_IFNAME_DEFAULT, "skip loopback and container bridges")
        if _has_real_interface(sys_root)
        else (None, "only virtual interfaces: NCCL picks"),
        ASYNC_ERROR_HANDLING: ("3", "a failed collective ends the process, so the agent restarts it"),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": ("1", "flight-recorder dump on a collective timeout"),
        _FR_BUFFER: ("2000", "flight-recorder entries kept per rank"),
    }
    plan = []
    for key in _MANAGED:
        value, reason = wanted[key]
        name = key
        if key == _FR_BUFFER:
            user_set = [v for v in FR_BUFFER_NAMES if v in environ]
            name = (
                user_set[0] if user_set else flight_recorder_buffer_var(torch_version or _installed_torch())
            )
        if key == ASYNC_ERROR_HANDLING and name not in environ and "NCCL_ASYNC_ERROR_HANDLING" in environ:
            # torch reads the TORCH_ name first: setting it would override the user's old spelling
            plan.append(
                EnvSetting(
                    "NCCL_ASYNC_ERROR_HANDLING",
                    environ["NCCL_ASYNC_ERROR_HANDLING"],
                    "user",
                    "set by the user: kept",
                )
            )
        elif name in environ:
            plan.append(EnvSetting(name, environ[name], "user", "set by the user: kept"))
        elif value is not None:
            plan.append(EnvSetting(name, value, "stalwart", reason))
        else:
            plan.append(EnvSetting(name, None, "unset", reason))
    return plan


def configure_network_env(
    environ: MutableMapping[str, str], *, sys_root: str = "/", torch_version: str | None = None
) -> dict[str, str]:
    """Set the usual NCCL/EFA variables in ``environ`` where the user has not set them.

    Returns the effective values of every variable it manages that ends up set (the user's or
    ours), for printing at start. Variables it leaves unset are absent from the result.
    """
    effective = {}
    for s in plan_network_env(environ, sys_root, torch_version):
        if s.value is None:
            continue
        if s.source == "stalwart":
            environ[s.name] = s.value
        effective[s.name] = s.value
    return effective
