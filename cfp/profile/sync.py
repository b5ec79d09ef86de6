"""What a collective costs more in a training step than from a barrier: the ranks' skew at a sync point.

Transition jobs (and the ZeRO gathers and reduce-scatters, which are priced as
transitions) time each collective from a barrier, where every rank arrives
together. In a step the collective follows compute, which no two ranks finish
at the same time, and it ends when the last rank arrives: the step pays the
expected gap between the last rank's arrival and the ranks' typical one.
Block jobs already pay it for their own collectives; data parallelism pays it
once per gradient bucket; an FSDP plan three times per block (a gather before
its forward and its backward, a reduce-scatter after its backward).

A sync job measures it per mesh dimension: every iteration, from a barrier,
every rank computes the same burst (``BURST_S`` of matmuls, the count agreed
across ranks) and all-reduces one element. A rank's time in that all-reduce
is the collective plus its wait for the last rank, so the last rank's is the
least, and the skew is the mean over iterations of the ranks' mean minus their
least. Means, not medians: a step sums many sync points, so the rare long
wait counts at its rate. On 2 gloo CPU ranks sharing 2 cores it measured
0.3-0.4 ms a sync point after bursts of 2 to 8 ms (the same size either
way), as much as the all-reduce itself. ``ProfileTable`` adds it to every
collective a transition or a gradient bucket runs. On a mesh of several
dimensions the barrier is the world's and the least is over every rank, the
groups along ``dim`` taken together.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.distributed as dist

BURST_S = 0.004  # compute before the all-reduce: about a block phase of the small presets
MIN_ITERS = 50  # the mean of a small, skewed difference: more iterations than a block job's, at a few ms each


def _burst_count(work, sync, device: str, group) -> int:
    """Matmuls in ``BURST_S``: timed here, the most any rank needs, so every rank computes the same."""
    work()
    sync()
    start = time.perf_counter()
    for _ in range(10):
        work()
    sync()
    one = (time.perf_counter() - start) / 10
    count = torch.tensor([math.ceil(BURST_S / max(one, 1e-7))], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())


def measure_sync(mesh, dim: int, device: str, warmup: int, iters: int) -> dict:
    """Rank side: this rank's per-iteration seconds in an all-reduce over mesh ``dim`` after a burst of compute."""
    group = mesh.get_group(dim)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    x = torch.ones(1, device=device)
    a = torch.randn(128, 128, device=device)

    def work():
        a @ a

    count = _burst_count(work, sync, device, group)
    times = []
    for i in range(warmup + max(iters, MIN_ITERS)):
        dist.barrier()
        for _ in range(count):
            work()
        sync()
        start = time.perf_counter()
        dist.all_reduce(x, group=group)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"status": "ok", "times": times}


def combine_sync(results: list[dict]) -> dict:
    """Rank results -> a sync row: ``total_s`` the skew (per iteration, the ranks' mean time in the all-reduce
    minus the least; the mean over iterations), ``forward_s`` the all-reduce itself (the least, its median)."""
    if any(r["status"] != "ok" for r in results):
        bad = next(r for r in results if r["status"] != "ok")
        return {"status": bad["status"], "error": bad.get("error", ""), "total_s": float("inf")}
    n = len(results[0]["times"])
    least = [min(r["times"][i] for r in results) for i in range(n)]
    skew = [statistics.fmean(r["times"][i] for r in results) - least[i] for i in range(n)]
    q = statistics.quantiles(skew, n=4) if n >= 2 else [skew[0]] * 3
    return {
        "status": "ok",
        "error": "",
        "forward_s": statistics.median(least),
        "backward_s": 0.0,
        "reduce_s": 0.0,
        "optimizer_s": 0.0,
        "comm_s": statistics.median(least),
        "total_s": statistics.fmean(skew),
        "total_min_s": min(skew),
        "total_max_s": max(skew),
        "total_iqr_s": q[2] - q[0],
        "iters": n,
        "memory_bytes": 0,
        "memory_source": "",
        "collectives": 1,
        "comm_bytes": 4,  # one float32 element
    }
