"""The worker bootstrap: ``python -m stalwart.worker.bootstrap``, the process a ``StandbyPool`` starts.

A *standby* imports torch, ``torch._dynamo`` (which DDP construction would otherwise import lazily),
``torch.distributed`` and the user's ``--preload`` modules, tells the pool it is ready, and blocks
until the pool sends it a launch spec over the control socket. A *fresh* bootstrap (``--fresh``)
skips the imports and reads its spec at once. Either way the spec then runs through ``_run``, which
makes the process look like ``python -u script.py args...`` (torchrun also passes ``-u``):
``os.environ`` is exactly the spec's env, ``sys.argv``, the cwd and ``sys.path[0]`` are those of a
plain run, the script runs as ``__main__``, and the exit status follows Python's rules.

What cannot be made identical, because it is fixed before the spec arrives:
- state read from the environment at interpreter start-up or import time: ``PYTHON*`` variables,
  thread-pool and allocator settings (``OMP_*``, ``MKL_*``, ``CUDA_*``, ``PYTORCH_*``,
  ``TORCH_DISTRIBUTED_DEBUG`` is read natively when torch loads), torch compiler config
  (``TORCHDYNAMO_*``, ``TORCHINDUCTOR_*``, ``TORCH_LOGS``...), ``TMPDIR`` (cached by ``tempfile``),
  locale and ``TZ``. ``import_sensitive_env`` names them; the pool starts standbys with the workers'
  values and launches a fresh process when a spec's values differ. Per-rank variables (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``, ``TORCHELASTIC_*``...) are not read at import and are safe.
- ``/proc/PID/cmdline`` and ``sys.orig_argv`` show the bootstrap; the process start time is the
  standby's; modules imported by the standby are already in ``sys.modules``, so warning filters
  installed by torch at import sit behind (not in front of) filters the script set before importing.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import signal
import socket
import struct
import sys
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TextIO

from stalwart.worker.api import ENV_STACK_DIR, STACK_DUMP_SIGNAL, stack_dump_path

__all__ = [
    "BASE_IMPORTS",
    "FrameDecoder",
    "encode_frame",
    "import_sensitive_env",
    "main",
]

BASE_IMPORTS = ("torch", "torch._dynamo", "torch.distributed")
"""Modules every standby imports before it reports ready."""

_SENSITIVE_PREFIXES = (
    "PYTHON",
    "LD_",
    "MALLOC_",
    "OMP_",
    "GOMP_",
    "KMP_",
    "MKL_",
    "MKLDNN_",
    "ONEDNN_",
    "DNNL_",
    "OPENBLAS_",
    "GOTO_",
    "NPY_",
    "NUMPY_",
    "CUDA_",
    "HIP_",
    "ROCR_",
    "PYTORCH_",
    "TORCH_",
    "TORCHDYNAMO_",
    "TORCHINDUCTOR_",
    "TORCHEXPORT_",
    "INDUCTOR_",
    "AOT_INDUCTOR_",
    "AOTINDUCTOR_",
    "SYMPY_",
    "LC_",
)
_SENSITIVE_NAMES = frozenset(
    {"PATH", "HOME", "TMPDIR", "TEMP", "TMP", "LANG", "LANGUAGE", "TZ", "USER", "LOGNAME"}
)

_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct(">I")
_MAX_FRAME = 16 << 20

# Kept open for the life of the worker: faulthandler writes to its fd from a signal handler.
_stack_file: TextIO | None = None


def import_sensitive_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` that the interpreter, torch or native libraries read at start-up/import.

    A standby can only serve a spec whose values for these variables equal its own.
    """
    return {k: v for k, v in env.items() if k in _SENSITIVE_NAMES or k.startswith(_SENSITIVE_PREFIXES)}


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """One control message: a 4-byte big-endian length, then UTF-8 JSON."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder for ``encode_frame`` messages read in arbitrary chunks."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; returns the messages it completed. Raises ``ValueError`` on garbage."""
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > _MAX_FRAME:
                raise ValueError(f"control frame of {n} bytes is too large")
            if len(self._buf) < _HEADER.size + n:
                break
            out.append(json.loads(bytes(self._buf[_HEADER.size : _HEADER.size + n])))
            del self._buf[: _HEADER.size + n]
        return out


def _recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Block until one whole frame arrives; ``None`` on EOF (the pool closed or died)."""
    decoder = FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        frames = decoder.feed(data)
        if frames:
            return frames[0]


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies; exit now if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(
            f"stalwart bootstrap: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr
        )
    # The parent may have died between fork and prctl; then we were re-parented already.
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def _preload(modules: Sequence[str]) -> dict[str, str]:
    """Import the base modules and ``modules``; returns ``{module: error}`` for preloads that failed."""
    import importlib

    for name in BASE_IMPORTS:
        importlib.import_module(name)
    errors: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(
                f"stalwart standby: preload module {name!r} failed to import ({errors[name]}); "
                "the worker will import it itself. Check --preload and PYTHONPATH.",
                file=sys.stderr,
                flush=True,
            )
    return errors


def _save_signals() -> dict[int, Any]:
    saved = {}
    for sig in signal.valid_signals():
        try:
            saved[int(sig)] = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
    return saved


def _restore_signals(saved: Mapping[int, Any]) -> None:
    """Put back the dispositions the interpreter had before the standby imported anything."""
    for sig, handler in saved.items():
        if handler is None or signal.getsignal(sig) is handler:
            continue
        try:
            signal.signal(sig, handler)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.set_wakeup_fd(-1)


def _register_stack_dump(env: Mapping[str, str]) -> None:
    global _stack_file
    stack_dir = env.get(ENV_STACK_DIR)
    if not stack_dir:
        return
    rank = int(env.get("RANK", "0") or 0)
    os.makedirs(stack_dir, exist_ok=True)
    _stack_file = open(stack_dump_path(stack_dir, rank, os.getpid()), "a")  # noqa: SIM115
    faulthandler.register(STACK_DUMP_SIGNAL, file=_stack_file, all_threads=True, chain=False)


def _set_environ(env: Mapping[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)


def _trim_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Drop this module's frames so the traceback starts where a plain run's would."""
    here = _this_file()
    while tb is not None and tb.tb_frame.f_code.co_filename == here:
        tb = tb.tb_next
    return tb


def _this_file() -> str:
    return __file__


def _record_error_file(exc: BaseException) -> None:
    """Write torch elastic's error file (``TORCHELASTIC_ERROR_FILE``) for ``exc``.

    Must run inside the ``except`` block. A file already written by the script's own ``@record``
    is kept: it is the same exception, recorded closer to its origin.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception as err:
        print(f"stalwart bootstrap: could not write error file {path}: {err}", file=sys.stderr)


def _exec_main_script(path: str) -> None:
    """Execute ``path`` as ``__main__`` the way the interpreter runs ``python path``."""
    if not os.path.isfile(path):
        import runpy  # a directory or zip file with __main__.py

        runpy.run_path(path, run_name="__main__")
        return
    from importlib.machinery import SourceFileLoader

    abspath = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    with open(abspath, "rb") as f:
        source = f.read()
    code = compile(source, abspath, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__file__ = abspath
    module.__cached__ = None  # type: ignore[attr-defined]
    module.__loader__ = SourceFileLoader("__main__", abspath)
    module.__package__ = None
    module.__spec__ = None
    module.__dict__.setdefault("__annotations__", {})
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


def _run(spec: Mapping[str, Any], saved_signals: Mapping[int, Any]) -> int:
    """Become the worker described by ``spec``; returns the exit code (or never returns)."""
    env = {str(k): str(v) for k, v in spec["env"].items()}
    entrypoint = str(spec["entrypoint"])
    args = [str(a) for a in spec["args"]]
    os.chdir(spec["cwd"])
    _restore_signals(saved_signals)
    if spec.get("no_python"):
        # As subprocess's restore_signals does: the interpreter ignores these, a program must not.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvpe(entrypoint, [entrypoint, *args], env)
        except OSError as exc:
            print(f"stalwart: cannot run {entrypoint!r}: {exc.strerror}", file=sys.stderr)
            return 127 if isinstance(exc, FileNotFoundError) else 126  # as a shell would

    _set_environ(env)
    _register_stack_dump(env)
    module = bool(spec.get("module"))
    # With -P (PYTHONSAFEPATH) the interpreter put neither the cwd nor the script's directory there.
    set_path0 = not sys.flags.safe_path
    if module:
        sys.argv = [entrypoint, *args]  # run_module replaces argv[0] with the module's file
        if set_path0:
            sys.path[0] = os.getcwd()
    else:
        if not os.path.exists(entrypoint):
            print(
                f"{sys.executable}: can't open file {os.path.abspath(entrypoint)!r}: "
                "[Errno 2] No such file or directory",
                file=sys.stderr,
            )
            return 2
        sys.argv = [entrypoint, *args]
        if set_path0:
            sys.path[0] = os.path.dirname(os.path.realpath(entrypoint))
    try:
        if module:
            import runpy

            runpy.run_module(entrypoint, run_name="__main__", alter_sys=True)
        else:
            _exec_main_script(entrypoint)
    except SystemExit:
        raise
    except KeyboardInterrupt as exc:
        _report_uncaught(exc)
        _exit_by_sigint()
    except BaseException as exc:
        _report_uncaught(exc)
        return 1
    return 0


def _report_uncaught(exc: BaseException) -> None:
    """Print ``exc`` through ``sys.excepthook`` and record it; called inside its ``except`` block."""
    exc.__traceback__ = _trim_traceback(exc.__traceback__)
    _record_error_file(exc)
    sys.excepthook(type(exc), exc, exc.__traceback__)


def _exit_by_sigint() -> NoReturn:
    # Python exits an uncaught KeyboardInterrupt by killing itself with SIGINT (status -2).
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(130)


def _parse_args(argv: Sequence[str]) -> tuple[int, int, list[str], bool]:
    control_fd, parent_pid, preload, fresh = -1, 0, [], False
    it = iter(argv)
    for arg in it:
        if arg == "--control-fd":
            control_fd = int(next(it))
        elif arg == "--parent-pid":
            parent_pid = int(next(it))
        elif arg == "--preload":
            preload.append(next(it))
        elif arg == "--fresh":
            fresh = True
        else:
            raise SystemExit(f"stalwart bootstrap: unknown argument {arg!r}")
    if control_fd < 0:
        raise SystemExit("stalwart bootstrap: --control-fd is required (it is started by StandbyPool)")
    return control_fd, parent_pid, preload, fresh


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``python -m stalwart.worker.bootstrap``."""
    control_fd, parent_pid, preload, fresh = _parse_args(sys.argv[1:] if argv is None else argv)
    _die_with_parent(parent_pid)
    saved_signals = _save_signals()
    sock = socket.socket(fileno=control_fd)
    if not fresh:
        t0 = time.monotonic()
        errors = _preload(preload)
        ready = {"ready": True, "pid": os.getpid(), "import_s": time.monotonic() - t0, "errors": errors}
        # Fails when the pool promoted us before we were ready and has already closed its end;
        # the spec then waits in the socket buffer.
        with contextlib.suppress(OSError):
            sock.sendall(encode_frame(ready))
    try:
        spec = _recv_frame(sock)
    except (OSError, ValueError):
        spec = None
    sock.close()
    if spec is None:
        os._exit(0)  # closed without a spec: the pool shut down
    keep = sys.modules.get("__main__")  # noqa: F841  (this module, while the script replaces __main__)
    sys.exit(_run(spec, saved_signals))


if __name__ == "__main__":
    main()
