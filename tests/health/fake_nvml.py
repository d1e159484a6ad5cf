"""A fake NVML behind pynvml's function names: scripted GPUs and events, NVML's real error types."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml


@dataclass
class FakeGpu:
    uuid: str
    supported_events: int = 0x1 | 0x2 | 0x8 | 0x4000 | 0x8000
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)
    ecc: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0})
    clock_reasons: int = 0
    temperature: int = 40
    power_mw: int = 300_000
    recovery_action: int = 0
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)  # call -> NVML error code it raises


class FakeNvml:
    """``init_error``: the NVML error code ``nvmlInit`` raises (e.g. 12: library not found)."""

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.events: deque[SimpleNamespace] = deque()
        self.registered: dict[int, int] = {}
        self.event_sets = 0
        self.calls: list[str] = []

    def _check(self, gpu: FakeGpu, name: str) -> None:
        self.calls.append(name)
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if name in gpu.errors:
            raise pynvml.NVMLError(gpu.errors[name])

    def xid(self, index: int, xid: int) -> None:
        self.events.append(SimpleNamespace(device=self.gpus[index], eventType=0x8, eventData=xid))

    def event(self, index: int, event_type: int, data: int = 0) -> None:
        self.events.append(SimpleNamespace(device=self.gpus[index], eventType=event_type, eventData=data))

    # -- pynvml's names ---------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.uuid

    def nvmlEventSetCreate(self) -> str:
        self.event_sets += 1
        return "event-set"

    def nvmlDeviceGetSupportedEventTypes(self, h: FakeGpu) -> int:
        self._check(h, "events")
        return h.supported_events

    def nvmlDeviceRegisterEvents(self, h: FakeGpu, types: int, event_set: Any) -> None:
        self.registered[self.gpus.index(h)] = types

    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> SimpleNamespace:
        if not self.events:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        return self.events.popleft()

    def nvmlDeviceGetFieldValues(self, h: FakeGpu, ids: list[int]) -> list[SimpleNamespace]:
        self._check(h, "recovery_action")
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=h.recovery_action))]

    def nvmlDeviceGetRemappedRows(self, h: FakeGpu) -> tuple[int, int, int, int]:
        self._check(h, "remapped_rows")
        return h.remapped_rows

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGpu, error_type: int, counter_type: int) -> int:
        self._check(h, "ecc")
        return h.ecc[error_type]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeGpu) -> int:
        self._check(h, "clock_events")
        return h.clock_reasons

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        self._check(h, "temperature")
        return h.temperature

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        self._check(h, "power")
        return h.power_mw
