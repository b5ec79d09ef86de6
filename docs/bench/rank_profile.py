"""Where a rank's training step goes: torch.profiler on rank 0 of a plan, beside the plain model on that
rank's share of the batch (one thread, as each rank has).

    cfp plan gpt:small --batch 8 --mesh 2 --cost analytic --baseline dp -o /tmp/dp.json
    python docs/bench/rank_profile.py /tmp/dp.json [--bucket-mb 2] [--steps 12]

Prints both step times (sorted), the process's CPU time and context switches per step (``getrusage``: every
thread, gloo's included), the plan's collectives and their waits, and the ops that took the most self time in
each. ``--bucket-mb`` changes the gradient bucket size of the lowered program
(``cfp.lower.BUCKET_MB``, 25 MB as DDP's) for this run. One gloo rank per mesh device, on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

import cfp
import cfp.lower
from cfp.allocator import keep_freed_host_memory
from cfp.bench import batch_share
from cfp.optim import adamw
from cfp.parallelize import parallelize, spec_of

PROFILED_STEPS = 3


def timed(step, steps: int, barrier=None) -> list[float]:
    times = []
    for _ in range(steps):
        if barrier:
            barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def training_step(model, inputs, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        model(*inputs).backward()
        opt.step()

    return step


def timed_with_usage(step, steps: int, barrier=None) -> tuple[list[float], str]:
    """Step times, and per step what the whole process (every thread) used of the CPU meanwhile."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = timed(step, steps, barrier)
    after = resource.getrusage(resource.RUSAGE_SELF)

    def per_step(field: str) -> float:
        return (getattr(after, field) - getattr(before, field)) / steps

    usage = (
        f"per step: user {per_step('ru_utime') * 1e3:.0f} ms, system {per_step('ru_stime') * 1e3:.0f} ms, "
        f"{per_step('ru_nivcsw'):.0f} preemptions, {per_step('ru_nvcsw'):.0f} waits, "
        f"{per_step('ru_minflt'):.0f} page faults"
    )
    return times, usage


def report(title: str, times: list[float], usage: str, prof) -> None:
    print(f"{title}: step ms {sorted(round(t * 1e3, 1) for t in times)}")
    print(f"  {usage}")
    for e in prof.key_averages(group_by_input_shape=True):
        if "c10d" in e.key or "wait_tensor" in e.key:
            per_step = e.self_cpu_time_total / 1e3 / PROFILED_STEPS
            print(f"  {e.key} x{e.count // PROFILED_STEPS}/step {per_step:.1f} ms/step {str(e.input_shapes)[:80]}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


def rank(rank: int, world: int, port: int, args) -> None:
    torch.set_num_threads(1)
    keep_freed_host_memory()
    if args.bucket_mb:
        cfp.lower.BUCKET_MB = args.bucket_mb
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    workload = cfp.build(spec_of(cfp.Plan.load(args.plan)))
    model = parallelize(workload.model, args.plan, example_inputs=workload.inputs)
    step = training_step(model, workload.inputs, adamw(model.parameters(), lr=1e-3))
    timed(step, 3, dist.barrier)
    times, usage = timed_with_usage(step, args.steps, dist.barrier)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        timed(step, PROFILED_STEPS, dist.barrier)
    if rank == 0:
        report(f"plan {args.plan}, rank 0 of {world}", times, usage, prof)
    dist.destroy_process_group()


def plain(args, world: int) -> None:
    """The plain model on rank 0's share of the batch, with one thread."""
    torch.set_num_threads(1)
    keep_freed_host_memory()
    workload = cfp.build(spec_of(cfp.Plan.load(args.plan)))
    inputs = batch_share(workload.inputs, 0, world)
    step = training_step(workload.model, inputs, adamw(workload.model.parameters(), lr=1e-3))
    timed(step, 3)
    times, usage = timed_with_usage(step, args.steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        timed(step, PROFILED_STEPS)
    report(f"plain model on 1/{world} of the batch, one thread", times, usage, prof)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", help="a plan file (cfp plan ... -o FILE)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps before the profiled ones")
    ap.add_argument("--bucket-mb", type=float, default=None, help="gradient bucket size of the lowered program")
    args = ap.parse_args()
    world = math.prod(cfp.Plan.load(args.plan).mesh["shape"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank, args=(world, port, args), nprocs=world)
    plain(args, world)


if __name__ == "__main__":
    main()
