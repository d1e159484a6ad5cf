"""GPU health through NVML: Xid events, ECC and row remapping, GPU lost, recovery action, throttling.

``nvml`` is anything with pynvml's function names (``Nvml``): the real ``pynvml`` module from
``nvidia-ml-py``, or a fake in tests that raises NVML's real error types. One event set is
created for the monitor's life (NVML allows one registration per process and device) and waited on
from a thread, so a wedged driver never blocks the agent loop; the slower reads (ECC, remapped rows,
clock-event reasons, the recovery-action field) run every ``check_interval`` seconds on the same
thread. Without NVML the monitor logs that once and stays off. NVML errors never escape: a call
that is not supported is skipped from then on, others are counted and logged once, and
``GpuIsLost``/``ResetRequired`` become a ``GPU_LOST`` fault.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from stalwart.health.api import Action, Fault, FaultKind, MonitorContext
from stalwart.health.base import MonitorBase
from stalwart.health.gpu_metrics import GpuCollector
from stalwart.health.xid import RECOVERY_ACTIONS, XID_RECOVERY_ACTION_CHANGED, xid_action

__all__ = ["GpuConfig", "GpuMonitor", "Nvml"]

logger = logging.getLogger(__name__)

# NVML constants (stable ABI values; named here so the fake need not define them)
EV_SBE, EV_DBE, EV_XID = 0x1, 0x2, 0x8
EV_GPU_UNAVAILABLE, EV_RECOVERY_ACTION = 0x4000, 0x8000
FI_RECOVERY_ACTION = 230
ERR_NOT_SUPPORTED, ERR_TIMEOUT, ERR_FUNCTION_NOT_FOUND, ERR_GPU_IS_LOST, ERR_RESET_REQUIRED = (
    3,
    10,
    13,
    15,
    16,
)
MEM_CORRECTED, MEM_UNCORRECTED, VOLATILE_ECC = 0, 1, 0
TEMPERATURE_GPU = 0
THROTTLE_REASONS = {
    0x8: "hw_slowdown",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}


class Nvml(Protocol):
    """The pynvml functions the monitor uses."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlEventSetCreate(self) -> Any: ...
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int: ...
    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None: ...
    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> Any: ...
    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> Any: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int: ...
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _is_nvml_error(exc: BaseException) -> bool:
    return type(exc).__name__.startswith("NVMLError")


@dataclass(kw_only=True, slots=True)
class GpuConfig:
    """GPU-monitor settings."""

    check_interval: float = 5.0
    event_wait_ms: int = 500
    xid_actions: dict[int, Action] = field(default_factory=dict)
    burst_window: float = 180.0  # NVIDIA groups Xids until 3 minutes of silence: one fault per burst
    throttle_checks: int = 3  # consecutive reads with a throttle reason before warning
    threaded: bool = True

    def __post_init__(self) -> None:
        if self.check_interval <= 0 or self.event_wait_ms < 0 or self.throttle_checks < 1:
            raise ValueError("gpu check interval must be > 0, event wait >= 0 and throttle checks >= 1")


@dataclass
class _Gpu:
    index: int
    handle: Any
    uuid: str
    healthy: bool = True
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)
    xids: dict[int, int] = field(default_factory=dict)
    ecc: dict[str, int] = field(default_factory=dict)
    remap: tuple[int, int, int, int] | None = None
    recovery: int | None = None
    throttle: dict[str, int] = field(default_factory=dict)  # reason -> consecutive active reads
    temperature: float | None = None
    power_w: float | None = None


class GpuMonitor(MonitorBase):
    """Emits ``GPU_XID``, ``GPU_ECC``, ``GPU_LOST`` and ``GPU_THROTTLE`` faults."""

    name = "gpu"
    keep_pending_across_starts = True

    def __init__(self, config: GpuConfig | None = None, nvml: Nvml | None = None) -> None:
        super().__init__()
        self.config = config or GpuConfig()
        self._nvml = nvml
        self.disabled: str | None = None
        self._initialized = False
        self._gpus: list[_Gpu] = []
        self._by_uuid: dict[str, _Gpu] = {}
        self._event_set: Any = None
        self._last_check = float("-inf")
        self._last_fault: dict[tuple[str, int, int], float] = {}
        self._errors: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._registries: set[int] = set()

    # -- lifecycle --------------------------------------------------------------------------------
    def _on_start(self, ctx: MonitorContext) -> None:
        if not self._initialized:
            self._initialized = True
            self._init()
        if self.metrics is not None and id(self.metrics.registry) not in self._registries:
            self._registries.add(id(self.metrics.registry))
            self.metrics.registry.register(GpuCollector(self))
        if self.disabled is None and self.config.threaded and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stalwart-nvml", daemon=True)
            self._thread.start()

    def _init(self) -> None:
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml  # type: ignore[assignment]
            nv = self._nvml
            assert nv is not None
            nv.nvmlInit()
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                gpu = _Gpu(i, h, str(nv.nvmlDeviceGetUUID(h)))
                self._gpus.append(gpu)
                self._by_uuid[gpu.uuid] = gpu
        except Exception as exc:
            self.disabled = (
                f"NVML is not available ({type(exc).__name__}: {exc}); GPU health monitoring is off"
            )
            logger.warning("%s", self.disabled)
            return
        if not self._gpus:
            self.disabled = "NVML sees no GPUs; GPU health monitoring is off"
            logger.warning("%s", self.disabled)
            return
        try:
            self._event_set = nv.nvmlEventSetCreate()
            for gpu in self._gpus:
                wanted = EV_XID | EV_DBE | EV_SBE | EV_GPU_UNAVAILABLE | EV_RECOVERY_ACTION
                supported = self._call(gpu, "events", nv.nvmlDeviceGetSupportedEventTypes, gpu.handle)
                if supported:
                    nv.nvmlDeviceRegisterEvents(gpu.handle, wanted & supported, self._event_set)
        except Exception as exc:
            self._error("nvmlEventSetCreate/RegisterEvents", exc)
            self._event_set = None
        logger.info("GPU health: watching %d GPU(s) through NVML", len(self._gpus))

    def close(self) -> None:
        """End the NVML thread and shut NVML down (at the agent's exit)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._nvml is not None and self._initialized and self.disabled is None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                self.step(time.time(), wait_ms=self.config.event_wait_ms)
            except Exception:
                logger.exception("NVML monitor step failed; continuing")
                self._closing.wait(1.0)

    def _check(self, now: float) -> None:
        if self.disabled is None and not self.config.threaded:
            self.step(now, wait_ms=0)

    # -- one round: events, then the periodic reads when due -----------------------------------------
    def step(self, now: float, wait_ms: int = 0) -> None:
        """Handle pending NVML events (waiting up to ``wait_ms``) and run the reads when due."""
        if self.disabled is not None:
            return
        self._drain_events(wait_ms)
        if now - self._last_check >= self.config.check_interval:
            self._last_check = now
            for gpu in self._gpus:
                if not gpu.lost:
                    self._read(gpu, now)

    def _drain_events(self, wait_ms: int) -> None:
        nv = self._nvml
        if self._event_set is None or nv is None:
            if wait_ms:
                self._closing.wait(wait_ms / 1000)
            return
        timeout = wait_ms
        for _ in range(1000):
            try:
                ev = nv.nvmlEventSetWait(self._event_set, timeout)
            except Exception as exc:
                if _code(exc) != ERR_TIMEOUT:
                    self._error("nvmlEventSetWait", exc)
                    if _code(exc) in (ERR_GPU_IS_LOST, ERR_RESET_REQUIRED):
                        for gpu in self._gpus:
                            self._lost(gpu, "nvmlEventSetWait", exc)
                return
            timeout = 0  # drain what is queued without waiting again
            self._on_event(ev)

    def _gpu_of(self, ev: Any) -> _Gpu:
        nv = self._nvml
        assert nv is not None
        for gpu in self._gpus:
            if gpu.handle is ev.device:
                return gpu
        try:
            return self._by_uuid[str(nv.nvmlDeviceGetUUID(ev.device))]
        except Exception:
            return self._gpus[0]

    def _on_event(self, ev: Any) -> None:
        gpu = self._gpu_of(ev)
        etype, data = int(ev.eventType), int(ev.eventData)
        if etype & EV_XID:
            self._on_xid(gpu, data)
        if etype & EV_DBE:
            self._fault(
                gpu, FaultKind.GPU_ECC, Action.RESTART, "double-bit ECC error event", {"event": "dbe"}, key=-2
            )
            self._last_check = float("-inf")  # read remapping state at once
        if etype & EV_GPU_UNAVAILABLE:
            self._lost(gpu, "event", None)
        if etype & EV_RECOVERY_ACTION:
            self._read_recovery(gpu)

    def _on_xid(self, gpu: _Gpu, xid: int) -> None:
        gpu.xids[xid] = gpu.xids.get(xid, 0) + 1
        if xid == XID_RECOVERY_ACTION_CHANGED and self._read_recovery(gpu):
            return
        desc, action, bucket = xid_action(xid, self.config.xid_actions)
        if action is Action.IGNORE:
            return
        self._fault(
            gpu,
            FaultKind.GPU_XID,
            action,
            f"Xid {xid}: {desc} (NVIDIA: {bucket})",
            {"xid": xid, "description": desc, "nvidia_resolution": bucket, "count": gpu.xids[xid]},
            key=xid,
        )

    # -- periodic reads ----------------------------------------------------------------------------
    def _read(self, gpu: _Gpu, now: float) -> None:
        nv = self._nvml
        assert nv is not None
        self._read_recovery(gpu)
        rows = self._call(gpu, "remapped_rows", nv.nvmlDeviceGetRemappedRows, gpu.handle)
        if rows is not None:
            corr, unc, pending, failure = (int(x) for x in rows)
            gpu.remap = (corr, unc, pending, failure)
            ev = {
                "remapped_correctable": corr,
                "remapped_uncorrectable": unc,
                "pending": bool(pending),
                "failure": bool(failure),
            }
            if failure:
                self._fault(
                    gpu, FaultKind.GPU_ECC, Action.REPLACE_NODE, "row remapping failed (RMA)", ev, key=-3
                )
            elif pending:
                self._fault(
                    gpu,
                    FaultKind.GPU_ECC,
                    Action.WARN,
                    "row remapping pending until the next GPU reset",
                    ev,
                    key=-4,
                )
        for name, etype in (("corrected", MEM_CORRECTED), ("uncorrected", MEM_UNCORRECTED)):
            total = self._call(
                gpu, f"ecc_{name}", nv.nvmlDeviceGetTotalEccErrors, gpu.handle, etype, VOLATILE_ECC
            )
            if total is None:
                continue
            before = gpu.ecc.get(name)
            gpu.ecc[name] = int(total)
            if name == "uncorrected" and before is not None and total > before:
                self._fault(
                    gpu,
                    FaultKind.GPU_ECC,
                    Action.RESTART,
                    f"uncorrectable ECC errors rose from {before} to {total}",
                    {"volatile_uncorrected": int(total), "before": before},
                    key=-5,
                )
        # nvidia-ml-py renamed "throttle reasons" to "clock event reasons"; accept either binding.
        clock_events = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        reasons = self._call(gpu, "clock_events", clock_events, gpu.handle) if clock_events else None
        if reasons is not None:
            for bit, reason in THROTTLE_REASONS.items():
                n = gpu.throttle.get(reason, 0) + 1 if int(reasons) & bit else 0
                gpu.throttle[reason] = n
                if n == self.config.throttle_checks:
                    self._fault(
                        gpu,
                        FaultKind.GPU_THROTTLE,
                        Action.WARN,
                        f"clocks throttled ({reason}) for {n} reads in a row",
                        {"reason": reason, "reasons_mask": int(reasons)},
                        key=-100 - bit,
                    )
        temp = self._call(gpu, "temperature", nv.nvmlDeviceGetTemperature, gpu.handle, TEMPERATURE_GPU)
        gpu.temperature = None if temp is None else float(temp)
        power = self._call(gpu, "power", nv.nvmlDeviceGetPowerUsage, gpu.handle)
        gpu.power_w = None if power is None else float(power) / 1000.0

    def _read_recovery(self, gpu: _Gpu) -> bool:
        nv = self._nvml
        assert nv is not None
        values = self._call(
            gpu, "recovery_action", nv.nvmlDeviceGetFieldValues, gpu.handle, [FI_RECOVERY_ACTION]
        )
        if not values:
            return False
        v = values[0]
        if int(getattr(v, "nvmlReturn", 0)) != 0:
            gpu.unsupported.add("recovery_action")
            return False
        code = int(v.value.uiVal)
        gpu.recovery = code
        name, action = RECOVERY_ACTIONS.get(code, (f"unknown({code})", Action.REPLACE_NODE))
        if code == 0:
            return False
        self._fault(
            gpu,
            FaultKind.GPU_XID if action is Action.RESTART else FaultKind.GPU_LOST,
            action,
            f"driver recovery action is {name}",
            {"recovery_action": code, "name": name},
            key=-6,
        )
        return True

    # -- helpers ---------------------------------------------------------------------------------------
    def _call(self, gpu: _Gpu, what: str, fn: Any, *args: Any) -> Any:
        if gpu.lost or what in gpu.unsupported:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            if not _is_nvml_error(exc):
                raise
            code = _code(exc)
            if code in (ERR_NOT_SUPPORTED, ERR_FUNCTION_NOT_FOUND):  # this GPU or driver lacks it
                gpu.unsupported.add(what)
            elif code in (ERR_GPU_IS_LOST, ERR_RESET_REQUIRED):
                self._lost(gpu, what, exc)
            else:
                self._error(what, exc)
            return None

    def _lost(self, gpu: _Gpu, what: str, exc: BaseException | None) -> None:
        if gpu.lost:
            return
        gpu.lost = True
        why = f"{type(exc).__name__} from {what}" if exc is not None else "GPU-unavailable event"
        self._fault(
            gpu,
            FaultKind.GPU_LOST,
            Action.REPLACE_NODE,
            f"GPU is lost or needs a reset ({why})",
            {"error": why},
            key=-1,
        )

    def _error(self, what: str, exc: BaseException) -> None:
        name = type(exc).__name__
        self._errors[name] = self._errors.get(name, 0) + 1
        if self._errors[name] == 1:
            logger.warning("NVML %s failed: %s: %s (counted in stalwart_nvml_errors_total)", what, name, exc)

    def _fault(
        self, gpu: _Gpu, kind: FaultKind, action: Action, message: str, evidence: dict[str, Any], key: int
    ) -> None:
        now = time.time()
        last = self._last_fault.get((kind.value, gpu.index, key))
        if last is not None and now - last < self.config.burst_window:
            return  # the same error on the same GPU within a burst: already reported
        self._last_fault[(kind.value, gpu.index, key)] = now
        if action in (Action.RESTART, Action.REPLACE_NODE, Action.STOP):
            gpu.healthy = False
        self._emit(
            Fault(
                kind=kind,
                action=action,
                message=f"GPU {gpu.index} ({gpu.uuid}): {message}",
                evidence={"gpu": gpu.index, "uuid": gpu.uuid, **evidence},
                node=self._node(),
                source=self.name,
                observed_at=now,
            )
        )
