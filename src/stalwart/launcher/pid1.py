"""Container init duties: when stalwart is PID 1, reap zombies and forward signals.

A container's PID 1 gets two jobs no ordinary program does: every orphaned process in the
container is re-parented to it (and stays a zombie until PID 1 waits for it), and the kernel drops
any signal PID 1 has no handler for (``docker stop`` sends SIGTERM to PID 1 and nothing else).

``run_as_init(main)`` splits the process in two when it is PID 1 (or ``STALWART_INIT=1``)::

    init (this process)                       agent (forked child, own process group)
      forwards TERM/INT/HUP/QUIT/USR1/USR2  -->  runs main(): stops its workers with a grace
      and the agent's --signals-to-handle        period and returns the job's exit code
      reaps every child on SIGCHLD
      exits with the agent's exit code

When the agent is gone, init stops whatever it left behind (orphans re-parented to init):
SIGTERM, ``LEFTOVER_GRACE_S`` seconds, SIGKILL. Outside PID 1 (forced mode) init also sets
``PR_SET_CHILD_SUBREAPER`` so that orphaned grandchildren are re-parented to it rather than to
the machine's init, and reaped and cleaned up the same way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable

import psutil

__all__ = ["ENV_INIT", "FORWARDED_SIGNALS", "LEFTOVER_GRACE_S", "run_as_init", "terminate_processes"]

ENV_INIT = "STALWART_INIT"
"""``1`` forces init mode even when this process is not PID 1; ``0`` disables it even as PID 1."""

# torch's --signals-to-handle default (SIGQUIT included) plus the user signals
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
LEFTOVER_GRACE_S = 5.0
"""Seconds processes left behind by the agent get between SIGTERM and SIGKILL."""

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def run_as_init(main: Callable[[], int], *, force: bool | None = None, signals: Iterable[int] = ()) -> int:
    """Run ``main`` (the agent); if this process is PID 1, also act as init. Returns the exit code.

    ``force`` overrides the decision (default: PID 1, or ``STALWART_INIT=1``; ``STALWART_INIT=0``
    turns init mode off). Without init mode this is just ``return main()``. ``signals``: more
    signals to forward besides ``FORWARDED_SIGNALS`` (the agent's ``--signals-to-handle``; as
    PID 1, init drops any signal it does not handle).
    """
    if force is None:
        env = os.environ.get(ENV_INIT, "")
        force = env == "1" or (os.getpid() == 1 and env != "0")
    if not force:
        return main()
    return _Init(main, {*FORWARDED_SIGNALS, *map(signal.Signals, signals)}).run()


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _exit_code(status: int) -> int:
    """The shell convention: the exit status, or 128 + signal number when killed."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class _Init:
    """The init side of ``run_as_init``; states: running the agent -> stopping leftovers -> done."""

    def __init__(self, main: Callable[[], int], forwarded: set[signal.Signals]) -> None:
        self._main = main
        self._agent_pid = 0
        self._agent_code: int | None = None
        self._waited = forwarded | {signal.SIGCHLD}

    def run(self) -> int:
        if os.getpid() != 1:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        # SIGCHLD must not be SIG_IGN, or the kernel auto-reaps and we lose the agent's status.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Block before fork so that no signal falls between the fork and the wait loop.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._waited)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._run_agent(old_mask)  # never returns
        self._agent_pid = pid
        try:
            os.setpgid(pid, pid)  # also done in the child; whichever runs first wins
        except (PermissionError, ProcessLookupError):
            pass
        while self._agent_code is None:
            info = signal.sigwaitinfo(self._waited)
            if info.si_signo == signal.SIGCHLD:
                self._reap()
            else:
                self._forward(info.si_signo)
        self._stop_leftovers()
        return self._agent_code

    def _run_agent(self, old_mask: set[signal.Signals]) -> None:
        code = 1
        try:
            os.setpgid(0, 0)
            # If init dies (forced mode, not PID 1), the agent should not run on unsupervised.
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            result = self._main()
            code = int(result) if result is not None else 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code & 0xFF)

    def _forward(self, sig: int) -> None:
        try:
            os.killpg(self._agent_pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        """Wait for every child that has exited: the agent and any re-parented orphan."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self._agent_pid:
                self._agent_code = _exit_code(status)

    def _stop_leftovers(self) -> None:
        """SIGTERM what the agent left behind, SIGKILL it after the grace period, reap it all."""
        left = psutil.Process().children(recursive=True)
        if not left:
            self._reap()
            return
        terminate_processes(left, left, LEFTOVER_GRACE_S)
        self._reap()


def terminate_processes(signalled: list[psutil.Process], waited: list[psutil.Process], grace: float) -> None:
    """SIGTERM ``signalled``, wait up to ``grace`` seconds for ``waited`` to exit, SIGKILL the
    ones still alive and wait for them (bounded). ``waited`` may hold whole process trees whose
    leaders alone are signalled; processes already gone are skipped."""
    for p in signalled:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(waited, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
