"""``stalwart doctor``: what this node has (GPUs, EFA, torch/NCCL/CUDA, the variables) and what
looks wrong.

Facts are gathered once into a ``NodeReport``; ``check`` is a pure function from the facts to
warnings, so each known-bad combination is tested without the hardware.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from stalwart.launcher.netenv import (
    ASYNC_ERROR_HANDLING,
    FR_BUFFER_NAMES,
    EfaDevice,
    EnvSetting,
    detect_efa_devices,
    instance_type,
    plan_network_env,
    supports_rdma_read,
)

__all__ = ["NodeReport", "check", "collect", "doctor_command"]

_SHOWN_PREFIXES = ("NCCL_", "TORCH_NCCL_", "FI_", "GLOO_", "CUDA_LAUNCH_BLOCKING", "TORCH_DISABLE_SHARE")
_PLUGIN_DIRS = (
    "opt/amazon/ofi-nccl/lib",
    "opt/amazon/ofi-nccl/lib64",
    "opt/aws-ofi-nccl/lib",
    "usr/local/lib",
)
_PLUGIN_VERSION = re.compile(rb"aws-ofi-nccl[^\x00\n]{0,24}?v?(\d+\.\d+\.\d+)")


@dataclass(slots=True)
class NodeReport:
    """Everything ``stalwart doctor`` found on this node."""

    instance_type: str | None
    versions: dict[str, str | None]
    gpus: list[dict[str, Any]]
    gpu_note: str
    efa: list[EfaDevice]
    efa_rdma_read: bool
    ofi_plugin: str | None
    variables: list[EnvSetting]
    other_variables: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gpu_inventory(nvml: Any = None) -> tuple[list[dict[str, Any]], str, str | None]:
    """GPUs through NVML (``pynvml`` from nvidia-ml-py, or an object with its functions).

    Returns (gpus, note, cuda driver version). The note says why the list is empty.
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return [], "no NVML (nvidia-ml-py not installed)", None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded...
        return [], f"no NVML ({exc})", None
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        cuda_driver = f"{cuda // 1000}.{cuda % 1000 // 10}"
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                {
                    "index": i,
                    "name": _text(nvml.nvmlDeviceGetName(h)),
                    "memory_gib": round(mem.total / 2**30, 1),
                }
            )
        return gpus, f"NVML: driver {driver}, CUDA driver {cuda_driver}", cuda_driver
    finally:
        nvml.nvmlShutdown()


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _torch_versions() -> dict[str, str | None]:
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": None, "nccl": None, "cuda_available": None}
    nccl = None
    try:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # CPU builds have no NCCL
        nccl = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "cuda_available": str(torch.cuda.is_available()),
    }


def find_ofi_plugin(
    sys_root: str = "/", environ: Mapping[str, str] = os.environ
) -> tuple[str | None, str | None]:
    """The aws-ofi-nccl plugin library and its version (when the binary names it), or Nones."""
    dirs = [os.path.join(sys_root, d) for d in _PLUGIN_DIRS]
    dirs += [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    for d in dirs:
        for lib in sorted(glob.glob(os.path.join(d, "libnccl-net*.so*"))):
            try:
                head = Path(lib).read_bytes()[: 64 << 20]
            except OSError:
                continue
            m = _PLUGIN_VERSION.search(head)
            return lib, m.group(1).decode() if m else None
    return None, None


def collect(environ: Mapping[str, str] = os.environ, *, sys_root: str = "/", nvml: Any = None) -> NodeReport:
    """Gather the facts about this node and the warnings they raise."""
    efa = detect_efa_devices(sys_root)
    itype = instance_type(sys_root)
    gpus, note, cuda_driver = gpu_inventory(nvml)
    plugin, plugin_version = find_ofi_plugin(sys_root, environ)
    versions = {"python": platform.python_version(), **_torch_versions()}
    versions["cuda_driver"] = cuda_driver
    versions["aws_ofi_nccl"] = plugin_version
    plan = plan_network_env(environ, sys_root)
    managed = {s.name for s in plan}
    other = {k: v for k, v in sorted(environ.items()) if k.startswith(_SHOWN_PREFIXES) and k not in managed}
    report = NodeReport(
        instance_type=itype,
        versions=versions,
        gpus=gpus,
        gpu_note=note,
        efa=efa,
        efa_rdma_read=supports_rdma_read(efa, itype),
        ofi_plugin=plugin,
        variables=plan,
        other_variables=other,
    )
    report.warnings = check(report)
    return report


def _version_tuple(v: str | None) -> tuple[int, ...] | None:
    if not v:
        return None
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check(r: NodeReport) -> list[str]:
    """Known-bad combinations in what workers will see (the user's variables plus our defaults)."""
    env = {s.name: s.value for s in r.variables if s.value is not None} | r.other_variables
    out = []
    aeh_name = ASYNC_ERROR_HANDLING if ASYNC_ERROR_HANDLING in env else "NCCL_ASYNC_ERROR_HANDLING"
    if env.get(aeh_name) == "0":
        out.append(
            f"{aeh_name}=0: a failed or hung NCCL collective never ends the worker, so the "
            "job hangs instead of restarting. Unset it (stalwart then uses 3)."
        )
    if "1" in (env.get("TORCH_NCCL_BLOCKING_WAIT"), env.get("NCCL_BLOCKING_WAIT")):
        out.append(
            "TORCH_NCCL_BLOCKING_WAIT=1 replaces async error handling: timeouts only raise in the thread "
            "that waits, and the flight recorder does not dump. Unset it unless you debug."
        )
    for name in FR_BUFFER_NAMES:
        if env.get("TORCH_NCCL_DUMP_ON_TIMEOUT") == "1" and env.get(name) == "0":
            out.append(f"{name}=0: flight-recorder dumps will be empty. Unset it or set 2000.")
    provider = env.get("FI_PROVIDER")
    if provider and not r.efa and "efa" in provider:
        out.append(
            f"FI_PROVIDER={provider} but this node has no EFA device: libfabric cannot open it. "
            "Unset FI_PROVIDER, or give the container the EFA devices (vpc.amazonaws.com/efa)."
        )
    if provider and r.efa and "efa" not in provider:
        out.append(
            f"FI_PROVIDER={provider} on a node with {len(r.efa)} EFA device(s): NCCL will not use EFA."
        )
    if env.get("FI_EFA_USE_DEVICE_RDMA") == "1" and r.efa and not r.efa_rdma_read:
        out.append(
            "FI_EFA_USE_DEVICE_RDMA=1 but these EFA devices lack RDMA read: libfabric fails. Unset it."
        )
    if r.efa and r.ofi_plugin is None:
        out.append(
            "EFA devices but no aws-ofi-nccl plugin (libnccl-net*.so) found: NCCL falls back to TCP "
            "sockets. Install aws-ofi-nccl or add its lib directory to LD_LIBRARY_PATH."
        )
    if env.get("CUDA_LAUNCH_BLOCKING") == "1":
        out.append(
            "CUDA_LAUNCH_BLOCKING=1 serialises every kernel launch (a debugging setting); unset it in production."
        )
    if r.gpus and r.versions.get("cuda_available") == "False":
        out.append(
            f"{len(r.gpus)} GPU(s) but torch cannot use CUDA (a CPU build of torch?): install a CUDA build."
        )
    torch_cuda, driver_cuda = (
        _version_tuple(r.versions.get("cuda")),
        _version_tuple(r.versions.get("cuda_driver")),
    )
    if torch_cuda and driver_cuda and torch_cuda[0] > driver_cuda[0]:
        out.append(
            f"torch is built for CUDA {r.versions['cuda']} but the driver supports CUDA {r.versions['cuda_driver']}: "
            "upgrade the driver or use a torch built for an older CUDA."
        )
    return out


def _print_rich(r: NodeReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    node = Table(title="Node", show_header=False)
    node.add_row("instance type", r.instance_type or "- (not EC2, or DMI unreadable)")
    for k, v in r.versions.items():
        node.add_row(k, v or "-")
    node.add_row("aws-ofi-nccl plugin", r.ofi_plugin or "- (not found)")
    console.print(node)

    gpus = Table(title="GPUs", caption=r.gpu_note)
    for col in ("index", "name", "memory GiB"):
        gpus.add_column(col)
    for g in r.gpus:
        gpus.add_row(str(g["index"]), g["name"], str(g["memory_gib"]))
    if not r.gpus:
        gpus.add_row("-", "none", "-")
    console.print(gpus)

    efa = Table(title="EFA devices", caption=f"RDMA read: {'yes' if r.efa_rdma_read else 'no'}")
    for col in ("name", "driver", "PCI id"):
        efa.add_column(col)
    for d in r.efa:
        efa.add_row(d.name, d.driver or "-", d.pci_device or "-")
    if not r.efa:
        efa.add_row("none", "-", "-")
    console.print(efa)

    env = Table(title="Worker environment (what stalwart run gives workers)")
    for col in ("variable", "value", "source", "why"):
        env.add_column(col)
    for s in r.variables:
        env.add_row(s.name, s.value if s.value is not None else "-", s.source, s.reason)
    for k, v in r.other_variables.items():
        env.add_row(k, v, "user", "")
    console.print(env)

    if r.warnings:
        for w in r.warnings:
            console.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    else:
        console.print("[green]no known-bad combinations found[/]")


@click.command(name="doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when there are warnings.")
@click.option("--sys-root", default="/", hidden=True, help="Read sysfs under this root (tests).")
def doctor_command(as_json: bool, strict: bool, sys_root: str) -> None:
    """Show GPUs, EFA devices, torch/NCCL/CUDA versions, the NCCL/EFA variables, and warnings."""
    report = collect(os.environ, sys_root=sys_root)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_rich(report)
    if strict and report.warnings:
        raise SystemExit(1)
