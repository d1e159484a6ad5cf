"""A fake sysfs tree for netenv/doctor tests: EFA devices, net interfaces, DMI product name."""

from __future__ import annotations

import os
from pathlib import Path


def make_sysfs(
    root: Path,
    *,
    efa: dict[str, str | None] | None = None,
    other_ib: tuple[str, ...] = (),
    interfaces: tuple[str, ...] = ("lo",),
    product: str | None = None,
) -> str:
    """Build the tree under ``root``; ``efa`` maps device name to its PCI id (None: no id file).

    Devices are laid out as the kernel does: the class entry's ``device`` is the PCI function
    directory and its ``driver`` a symlink into ``/sys/bus/pci/drivers``.
    """
    ib = root / "sys/class/infiniband"
    ib.mkdir(parents=True, exist_ok=True)
    drivers = root / "sys/bus/pci/drivers"
    for i, (name, pci_id) in enumerate((efa or {}).items()):
        _device(root, ib, drivers, name, f"0000:00:{16 + i:02x}.0", "efa", pci_id)
    for i, name in enumerate(other_ib):
        _device(root, ib, drivers, name, f"0000:01:{i:02x}.0", "mlx5_core", "0x101b")
    net = root / "sys/class/net"
    net.mkdir(parents=True, exist_ok=True)
    for name in interfaces:
        (net / name).mkdir(exist_ok=True)
    if product is not None:
        dmi = root / "sys/devices/virtual/dmi/id"
        dmi.mkdir(parents=True, exist_ok=True)
        (dmi / "product_name").write_text(product + "\n")
    return str(root)


def _device(
    root: Path, ib: Path, drivers: Path, name: str, bdf: str, driver: str, pci_id: str | None
) -> None:
    pci = root / "sys/devices/pci0000:00" / bdf
    (pci / "infiniband" / name).mkdir(parents=True)
    (drivers / driver).mkdir(parents=True, exist_ok=True)
    os.symlink(drivers / driver, pci / "driver")
    if pci_id is not None:
        (pci / "device").write_text(pci_id + "\n")
    (pci / "vendor").write_text("0x1d0f\n")
    os.symlink(pci / "infiniband" / name, ib / name)
    os.symlink(pci, pci / "infiniband" / name / "device")
