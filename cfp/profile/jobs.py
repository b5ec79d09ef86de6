"""Profile jobs: what one rank does for a job, and how ranks' results combine.

A job is one (block class, config), one transition, or the ranks' skew at a
sync point over one mesh dimension (``cfp.profile.sync``). Every rank of a real
process group (or the single process of the emulated backend) runs
``execute`` and returns its per-iteration phase times; ``combine`` takes,
per iteration, the max over ranks (the step waits for the slowest rank),
then the median and spread over iterations.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from cfp.costs import TransitionKey
from cfp.placements import to_strs
from cfp.profile.program import BlockProgram, TransitionProgram
from cfp.profile.sync import combine_sync, measure_sync


@dataclass(frozen=True)
class Job:
    kind: str  # "block", "transition" or "sync"
    class_id: str = ""
    config: str = ""
    mesh_dim: int = 0  # a sync job's
    transition: TransitionKey | None = None
    runtime: str = "lowered"  # how the program runs (cfp.profile.program.RUNTIMES)

    def describe(self) -> str:
        if self.kind == "block":
            return f"block class {self.class_id} config {self.config!r}"
        if self.kind == "sync":
            return f"skew at a sync point on mesh dim {self.mesh_dim}"
        k = self.transition
        return f"transition {k.shape} {k.dtype} {'/'.join(to_strs(k.src))} -> {'/'.join(to_strs(k.dst))}"


@dataclass
class RankContext:
    """What a rank needs to run jobs: the analysed graph (None for calibration), its mesh and device."""

    graph: object
    mesh: object  # DeviceMesh
    device: str
    rank: int = 0


def _is_oom(exc: BaseException) -> bool:
    return (
        isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower() or isinstance(exc, MemoryError)
    )


def execute(ctx: RankContext, job: Job, warmup: int, iters: int, seed: int = 0) -> dict:
    """Run one job on this rank; returns its times, collectives and memory (or status ``oom`` or
    ``failed``, with the error)."""
    cuda = ctx.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import torch.distributed as dist

    real = dist.is_initialized() and dist.get_backend() != "fake"
    barrier = dist.barrier if real else (lambda: None)
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if job.kind == "sync":
            return measure_sync(ctx.mesh, job.mesh_dim, ctx.device, warmup, iters)
        if job.kind == "block":
            graph = ctx.graph
            block = graph.blocks[graph.classes[job.class_id][0]]
            strategy = next(p for p in graph.strategies[job.class_id] if p.config.name == job.config)
            program = BlockProgram(graph, block, strategy, ctx.mesh, ctx.device, seed, job.runtime)
        else:
            program = TransitionProgram(job.transition, ctx.mesh, ctx.device, seed, job.runtime)
        times, collectives = program.measure(warmup, iters, sync, barrier)
        if cuda:
            memory, source = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
        else:
            memory, source = program.estimated_memory(), "estimate_local_shapes"
        return {
            "status": "ok",
            "forward": times.forward,
            "backward": times.backward,
            "reduce": times.reduce,
            "optimizer": times.optimizer,
            "collectives": [(c.kind, c.mesh_dim, c.bytes, c.phase) for c in collectives],
            "comm_seconds": sum(c.seconds for c in collectives),
            "memory": int(memory),
            "memory_source": source,
        }
    except Exception as exc:
        # A config that cannot run here (no DTensor rule, a runtime error, out of memory) is
        # stored as infeasible with its reason: the ILP avoids it and the run goes on.
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        return {"status": "oom" if _is_oom(exc) else "failed", "error": reason}


def combine_ranks(job: Job, results: list[dict]) -> dict:
    """The real backend's ranks' results for ``job`` -> its row's measurements."""
    return combine_sync(results) if job.kind == "sync" else combine(results)


def combine(results: list[dict], comm_priced: dict[str, float] | None = None) -> dict:
    """Rank results -> one row's measurements (seconds).

    ``total_s`` is the slowest rank's median iteration without the
    gradient reduction, plus the reduction. A rank that reaches a collective
    first waits inside it, so its iteration already counts the other rank's
    lateness wherever the block synchronises them; where it does not (data
    parallelism's forward and backward), in a training step each rank's
    noise evens out over the blocks rather than adding up block by block,
    as a per-iteration maximum over ranks would have it (which predicted
    data-parallel gpt:small 33% slow). The reduction follows backward with
    no barrier between, so a rank's ``reduce`` includes waiting for the
    other's backward: it is the per-iteration least over ranks (the last
    rank in waits least). Each other phase is the slowest rank's median.
    The spread is that of the per-iteration totals (max over ranks).

    ``comm_priced``: the emulated backend's communication time per phase,
    added to the measured local compute. On the real backend communication is
    inside the measured phases; ``comm_s`` is then the slowest rank's timed
    collectives (issue to result, waiting for other ranks included).
    """
    if any(r["status"] != "ok" for r in results):
        bad = next(r for r in results if r["status"] != "ok")
        return {"status": bad["status"], "error": bad.get("error", ""), "total_s": float("inf")}
    n = len(results[0]["forward"])
    phases = ("forward", "backward", "reduce", "optimizer")
    comm = comm_priced or {}
    seconds = {ph: max(statistics.median(r[ph]) for r in results) for ph in phases}
    seconds["reduce"] = statistics.median(min(r["reduce"][i] for r in results) for i in range(n))
    local = ("forward", "backward", "optimizer")
    iteration = max(statistics.median(sum(r[ph][i] for ph in local) for i in range(n)) for r in results)
    for ph in ("forward", "backward", "reduce"):
        seconds[ph] += comm.get(ph, 0.0)
    totals = [max(sum(r[ph][i] for ph in phases) for r in results) + sum(comm.values()) for i in range(n)]
    q = statistics.quantiles(totals, n=4) if len(totals) >= 2 else [totals[0]] * 3
    return {
        "status": "ok",
        "error": "",
        **{f"{ph}_s": seconds[ph] for ph in phases},
        "comm_s": sum(comm.values()) if comm_priced is not None else max(r["comm_seconds"] for r in results),
        "total_s": iteration + comm.get("forward", 0.0) + comm.get("backward", 0.0) + seconds["reduce"],
        "total_min_s": min(totals),
        "total_max_s": max(totals),
        "total_iqr_s": q[2] - q[0],
        "iters": n,
        "memory_bytes": max(r["memory"] for r in results),
        "memory_source": results[0]["memory_source"],
        "collectives": len(results[0]["collectives"]),
        "comm_bytes": sum(c[2] for c in results[0]["collectives"]),
    }


def compare_with_reference(
    ctx: RankContext, pairs: list[tuple[str, str]], seed: int = 0, runtime: str = "lowered"
) -> dict:
    """For tests and self-checks: run each (class id, config) once on the mesh and compare its
    exit values and reduced parameter gradients with the same ops on one device.

    Returns ``{(class_id, config): max abs difference}``; every rank must call it.
    """
    from torch.distributed.tensor import DTensor

    from cfp.profile.program import reference

    graph = ctx.graph
    out = {}
    for class_id, config in pairs:
        block = graph.blocks[graph.classes[class_id][0]]
        strategy = next(p for p in graph.strategies[class_id] if p.config.name == config)
        program = BlockProgram(graph, block, strategy, ctx.mesh, ctx.device, seed, runtime)
        _, _, got = program.iterate()
        want_values, want_grads = reference(program)

        def full(t):
            return t.full_tensor() if isinstance(t, DTensor) else t

        diff = 0.0
        for name in block.outputs:
            a, b = full(got["values"][name]), want_values[name]
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                diff = max(diff, (a.detach() - b.detach()).abs().max().item())
        names = [i.name for i in block.inputs if i.name in graph.traced.params]
        for name, g in zip(names, got["grads"]):
            if name in want_grads and want_grads[name] is not None:
                diff = max(diff, (full(g) - want_grads[name]).abs().max().item())
        out[(class_id, config)] = diff
    return out
