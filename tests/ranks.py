"""Running a test's worker on real gloo ranks: spawned CPU processes, one free port, one deadline."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traced(fault_file: str, target: Callable, *args) -> None:
    """``target(*args)``, writing every thread's Python stack to ``fault_file`` if the process crashes,
    so that a rank killed by a signal says where.

    A rank that finished its work leaves without the interpreter's shutdown: what a test checks is in
    the files the rank wrote. CI once saw one rank of the parity test end in SIGSEGV, with nothing said
    of where; if that was the shutdown (gloo's threads outliving the interpreter), it is skipped now, and
    if it was not, the stack written here says where."""
    faulthandler.enable(open(fault_file, "w"), all_threads=True)  # noqa: SIM115
    target(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(target: Callable, args: tuple, timeout_s: float, world: int = 2) -> None:
    """``target(rank, world, port, *args)`` in ``world`` spawned processes; any still running at the
    deadline is killed, and every one must exit 0 (a rank reports its results through files it writes)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as faults:
        fault_files = [str(Path(faults) / f"rank{rank}.txt") for rank in range(world)]
        procs = [
            ctx.Process(target=_traced, args=(fault_files[rank], target, rank, world, port, *args))
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.time() + timeout_s
        for p in procs:
            p.join(max(1, deadline - time.time()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        codes = [p.exitcode for p in procs]
        stacks = "".join(
            f"\nrank {rank} (exit code {code}):\n{Path(fault_files[rank]).read_text()[-4000:]}"
            for rank, code in enumerate(codes)
            if code != 0
        )
    assert all(code == 0 for code in codes), f"a rank failed: exit codes {codes}{stacks}"
