"""Running a test's worker on real gloo ranks: spawned CPU processes, one free port, one deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable, args: tuple, timeout_s: float, world: int = 2) -> None:
    """``target(rank, world, port, *args)`` in ``world`` spawned processes; any still running at the
    deadline is killed, and every one must exit 0 (a rank reports its results through files it writes)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout_s
    for p in procs:
        p.join(max(1, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert all(p.exitcode == 0 for p in procs), f"a rank failed: exit codes {[p.exitcode for p in procs]}"
