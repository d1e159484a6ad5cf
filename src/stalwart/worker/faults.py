"""Fault injection: make a chosen rank fail in a chosen way at a chosen step, once.

Set ``STALWART_FAULT`` (or pass ``stalwart run --fault SPEC``) to one or more comma-separated specs::

    KIND[:key=value]...

    crash:rank=1:step=20          # rank 1 kills itself with SIGKILL after step 20
    crash:rank=0:step=5:exit_code=3   # ...or exits with status 3
    raise:rank=0:step=5           # raises RuntimeError from report()
    hang:rank=1:step=30           # blocks forever in time.sleep (the GIL is released)
    hang_gil:rank=1:step=30       # blocks forever holding the GIL (a C call via ctypes.PyDLL)
    stop:rank=1:step=30           # SIGSTOP itself (as if frozen by the kernel or a debugger)
    nan:rank=0:step=12            # report() returns and sends NaN as the loss
    slow:rank=1:step=10:factor=2  # from step 10 on, every step takes ``factor`` times as long

Keys: ``rank`` (global rank, default 0), ``step`` (default 10), ``once`` (default true: the fault
fires once per job, recorded by a marker file in ``STALWART_FAULT_MARKER_DIR``; restarted workers
do not fire it again). Steps are those passed to ``stalwart.worker.report``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field

from stalwart.errors import ConfigError
from stalwart.worker.api import ENV_FAULT, ENV_FAULT_MARKER_DIR

__all__ = ["KINDS", "FaultSpec", "active", "on_step", "parse_faults"]

KINDS = ("crash", "raise", "hang", "hang_gil", "stop", "nan", "slow")
_INT_KEYS = {"rank", "step", "exit_code", "signal"}
_FLOAT_KEYS = {"factor"}
_BOOL_KEYS = {"once"}


class InjectedFault(RuntimeError):
    """Raised by ``report()`` for an injected ``raise`` fault."""


@dataclass(slots=True)
class FaultSpec:
    """One parsed fault: what to do, to which rank, from which step."""

    kind: str
    rank: int = 0
    step: int = 10
    exit_code: int | None = None
    signal: int = int(signal.SIGKILL)
    factor: float = 2.0
    once: bool = True
    text: str = ""
    fired: bool = field(default=False, compare=False)


def parse_faults(text: str) -> list[FaultSpec]:
    """Parse a ``STALWART_FAULT`` value; raises ``ConfigError`` naming the bad part."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, *pairs = part.split(":")
        if kind not in KINDS:
            raise ConfigError(f"fault spec {part!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        spec = FaultSpec(kind=kind, text=part)
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(f"fault spec {part!r}: {pair!r} is not key=value")
            try:
                if key in _INT_KEYS:
                    v: object = (
                        int(
                            signal.Signals[
                                value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
                            ]
                        )
                        if key == "signal" and not value.isdigit()
                        else int(value)
                    )
                elif key in _FLOAT_KEYS:
                    v = float(value)
                elif key in _BOOL_KEYS:
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(value)
                    v = value.lower() in ("true", "1")
                else:
                    raise ConfigError(
                        f"fault spec {part!r}: unknown key {key!r}; use rank, step, exit_code, signal, factor, once"
                    )
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"fault spec {part!r}: bad value for {key!r}: {value!r}") from exc
            setattr(spec, key, v)
        if spec.step < 0 or spec.rank < 0:
            raise ConfigError(f"fault spec {part!r}: rank and step must be >= 0")
        if spec.kind == "slow" and spec.factor <= 1.0:
            raise ConfigError(f"fault spec {part!r}: factor must be > 1 for a slow fault")
        specs.append(spec)
    return specs


class _State:
    def __init__(self) -> None:
        self.pid = -1
        self.specs: list[FaultSpec] = []
        self.slow: FaultSpec | None = None
        self.last_step_time: float | None = None

    def ensure(self) -> None:
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self.specs = parse_faults(os.environ.get(ENV_FAULT, ""))
        self.slow = None
        self.last_step_time = None


_state = _State()


def _claim(spec: FaultSpec) -> bool:
    """True if this process may fire ``spec`` (first claim of its marker, or ``once=false``)."""
    if not spec.once:
        return True
    marker_dir = os.environ.get(ENV_FAULT_MARKER_DIR) or os.path.join(
        tempfile.gettempdir(), "stalwart-faults"
    )
    os.makedirs(marker_dir, exist_ok=True)
    # once per job: another job (run id) that finds this directory, reused, fires its own
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    name = hashlib.sha1(f"{job}\n{spec.text}".encode()).hexdigest()[:16]
    try:
        fd = os.open(os.path.join(marker_dir, f"fault-{name}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, f"{spec.text} pid={os.getpid()} time={time.time():.3f}\n".encode())
    os.close(fd)
    return True


def _fire(spec: FaultSpec, step: int, loss: float | None) -> float | None:
    print(f"[stalwart] injecting fault {spec.text!r} at step {step} (pid {os.getpid()})", flush=True)
    if spec.kind == "crash":
        if spec.exit_code is not None:
            os._exit(spec.exit_code)
        os.kill(os.getpid(), spec.signal)
        time.sleep(60)  # the signal is delivered asynchronously; never return into training
        os._exit(1)
    if spec.kind == "raise":
        raise InjectedFault(f"stalwart injected fault {spec.text!r} at step {step}")
    if spec.kind == "hang":
        while True:
            time.sleep(3600)
    if spec.kind == "hang_gil":
        # PyDLL keeps the GIL during the call: no other Python thread in this process can run.
        libc = ctypes.PyDLL(None)
        while True:
            libc.sleep(3600)
    if spec.kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return loss
    if spec.kind == "nan":
        return float("nan")
    if spec.kind == "slow":
        _state.slow = spec
        return loss
    raise AssertionError(f"unhandled fault kind {spec.kind}")


def active() -> bool:
    """True if this process has any fault to inject (``STALWART_FAULT`` is set and not empty)."""
    _state.ensure()
    return bool(_state.specs)


def on_step(step: int, loss: float | None, rank: int) -> float | None:
    """Apply any fault due at ``step`` for ``rank``; returns the (possibly replaced) loss."""
    _state.ensure()
    now = time.monotonic()
    if _state.slow is not None and _state.last_step_time is not None:
        time.sleep((now - _state.last_step_time) * (_state.slow.factor - 1.0))
        now = time.monotonic()
    _state.last_step_time = now
    for spec in _state.specs:
        if spec.fired or spec.rank != rank or step < spec.step:
            continue
        spec.fired = True
        if _claim(spec):
            loss = _fire(spec, step, loss)
    return loss
