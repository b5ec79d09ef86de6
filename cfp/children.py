"""Worker processes die with the process that started them, in every state.

``die_with_parent`` is called first thing in every worker CFP starts (profiling ranks, analysis workers). Two
mechanisms, because a worker may be anywhere when its parent goes (blocked in a collective, in user code, idle):

- Linux's ``PR_SET_PDEATHSIG``: the kernel sends SIGKILL when the parent exits, however it exits (kill -9
  included). It fires when the *thread* that started the worker ends, so pools are started from the main thread.
- a watchdog thread that polls the parent pid, for systems without ``prctl``; it runs whatever the main thread
  is doing, since blocking calls (collectives, sleeps, torch ops) release the GIL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog alone
    if os.getppid() != parent_pid:  # the parent went before prctl took effect
        os._exit(1)

    def watch() -> None:
        # Signals go to the main thread: one delivered here would leave a main thread blocked in a lock
        # (a pool worker waiting for work when Pool.terminate sends SIGTERM) waiting forever.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="cfp-parent-watchdog", daemon=True).start()


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (``finally`` blocks and ``atexit`` stop the workers) instead of killing outright.

    Python runs a signal's handler wherever the main thread is, and an exception raised inside a callback whose
    errors Python ignores is lost: a SIGTERM that arrived while ``Pool`` forked a worker raised its ``SystemExit`` in
    ``logging``'s at-fork hook, and the command went on running. Such a lost interruption is delivered again.
    """

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, handler)
    previous = sys.unraisablehook

    def redeliver_lost_interrupts(unraisable) -> None:
        signum = _interrupting_signal(unraisable.exc_value)
        if signum is None:
            previous(unraisable)
            return
        # Not from here: the main thread is still inside the callback that swallowed the first one.
        try:
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        except RuntimeError:  # the interpreter is shutting down: it exits anyway
            previous(unraisable)

    sys.unraisablehook = redeliver_lost_interrupts


def _interrupting_signal(exc: BaseException | None) -> int | None:
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM:
        return signal.SIGTERM
    return None
