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
    """SIGTERM unwinds like Ctrl-C (``finally`` blocks and ``atexit`` stop the workers) instead of killing outright."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
