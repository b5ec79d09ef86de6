"""Plans side by side in real training steps: what ``cfp bench`` runs.

1. The model is analysed and profiled on the real backend (stored profiles
   are reused), and each plan is made: ``cfp`` (the ILP over those profiles),
   ``analytic`` (the same ILP over the Alpa-style analytic cost model; any
   cost model registered in ``cfp.costs.COST_MODELS`` races by its name), the
   baselines of ``cfp.baselines``, and plan files given by path.
   A plan name may carry a runtime variant: ``cfp+interpreted`` runs CFP's
   plan on the DTensor interpreter instead of the lowered programs,
   ``cfp+compiled`` its lowered programs compiled by inductor.
2. Every plan's predicted step time is the profiled cost model's, so the
   plans are predicted, and the prediction checked, by one yardstick. Where
   ``cfp plan --validate`` has stored measurements of this model, the
   prediction is corrected (cfp.correction); the raw one is reported too.
3. One worker pool (a process per mesh rank) builds the model once per plan
   from the same seed and applies the plan with ``cfp.parallelize``. Training
   steps (forward, backward, AdamW) then run round-robin over the plans, in a
   new random order each round (``round_orders``), so machine noise hits every
   plan alike and no plan always runs right after the same other one. A step's
   time is the slowest rank's, from a barrier to the end of the optimizer
   step; the first ``warmup`` rounds are not counted.
4. The ``single`` row is the plain model, not parallelised, in this process
   on the same global batch with as many threads as all ranks together (on
   GPUs: one GPU); its steps take their turn in the same rounds. Each
   plan's ``speedup`` is single's step time over the plan's.
   The ``ideal`` row is every rank training the plain model on its share of
   the batch (dim 0), all at once, with no communication: the best any plan
   over these ranks could do on these devices. Its speedup is the ideal one,
   which is the number of ranks only where single gets as much hardware as
   all ranks together and uses it as well (on 2 CPU cores, single already has
   both: the ideal measured 1.04x on gpt:small and 0.92x on moe:small, batch 8).
5. Peak memory per rank comes from one more step per plan: CUDA's allocator
   peak on GPUs, ``MemTracker`` (every live tensor's storage) on CPU. It is
   shown beside the plan's predicted per-device memory (parameters,
   gradients, optimizer state, activations, as the ILP counts them for the
   plan's configs, storage levels and recomputation).

All plans start from the same weights and see the same batch, so their
first-step losses must agree: the table shows them as a check.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from cfp.allocator import keep_freed_host_memory
from cfp.costs import COST_MODELS, CostSetup
from cfp.errors import CFPError
from cfp.mesh import MeshSpec, parse_mesh
from cfp.optim import adamw
from cfp.pipeline import PlanOptions, cost_model, make_plan
from cfp.placements import local_tensor
from cfp.plan import Plan
from cfp.spec import ModelSpec

DEFAULT_PLANS = ("cfp", "dp", "megatron", "expert", "fsdp", "fsdp+tp", "analytic")
SINGLE = "single"
IDEAL = "ideal"
VARIANTS = {"interpreted": {"lowered": False}, "compiled": {"compile": True}}  # plan name suffixes: cfp+interpreted
COLUMNS = [
    "plan",
    "median_step_s",
    "iqr_step_s",
    "min_step_s",
    "max_step_s",
    "fwd_bwd_s",
    "optimizer_s",
    "predicted_step_s",
    "predicted_optimizer_s",
    "prediction_error",
    "raw_predicted_step_s",
    "raw_prediction_error",
    "peak_mem_bytes",
    "predicted_mem_bytes",
    "mem_error",
    "ratio_to_cfp",
    "speedup",
    "first_loss",
    "configs",
    "layout",
    "steps",
]


@dataclass
class BenchPlan:
    name: str
    plan: Plan
    predicted_s: float  # under the profiled cost model
    predicted_optimizer_s: float  # the AdamW steps of its blocks, part of predicted_s
    predicted_mem_bytes: int = 0  # per device, as the ILP counts it
    raw_predicted_s: float = math.nan  # before the correction learnt from validations (cfp.correction)
    lowered: bool = True  # run as lowered local programs (False: the DTensor interpreter)
    compile: bool | None = None  # the lowered programs compiled by inductor; None: as the plan was profiled


def split_variant(name: str) -> tuple[str, dict]:
    """``"cfp+interpreted"`` -> ``("cfp", {"lowered": False})``; a name without a variant -> ``(name, {})``."""
    from cfp.baselines import BASELINES

    base, plus, variant = name.rpartition("+")
    if not plus or not base or name in BASELINES or name.endswith(".json"):  # "fsdp+tp" is a baseline's own name
        return name, {}
    if variant not in VARIANTS:
        raise CFPError(f"Unknown plan variant {variant!r} in {name!r}: use {', '.join('+' + v for v in VARIANTS)}.")
    return base, VARIANTS[variant]


@dataclass
class BenchResult:
    table: pd.DataFrame  # one row per plan, COLUMNS
    model: str
    mesh: MeshSpec
    device: str
    steps: int
    wall_s: float
    skipped: dict[str, str] = field(default_factory=dict)  # plan -> why it was not run
    ideal_speedup: float = 1.0  # single's step over the ideal row's, else the number of ranks

    def to_csv(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(path, index=False)


# --------------------------------------------------------------------------
# Making the plans
# --------------------------------------------------------------------------


def _choice_of(plan: Plan, graph) -> list[int]:
    """Config index per block of a plan loaded from a file (it must be for this model)."""
    from cfp.parallelize import config_indices

    plan.check_matches(graph.traced)
    return config_indices(graph, [entry["config"] for entry in plan.blocks])


def layout_of(plan: Plan) -> tuple[list[str], list[bool]]:
    """Per block of a plan: its storage level and whether it recomputes."""
    return [b.get("storage", "replicate") for b in plan.blocks], [bool(b.get("recompute")) for b in plan.blocks]


def make_plans(
    spec: ModelSpec, mesh: MeshSpec, names: list[str], cluster=None, progress=None, strict: bool = True, memory=None
) -> tuple[list[BenchPlan], dict[str, str]]:
    """The plans to bench, each with its profiled prediction; and the baselines left out (with why).

    A baseline that does not apply to the model is an error when ``strict``
    (the user asked for it), else it is left out. Names are checked before
    anything is profiled. ``memory`` (bytes or a size) limits the plans CFP makes.
    """
    from cfp import baselines
    from cfp.correction import uncorrected
    from cfp.profile import analyze_for_profile
    from cfp.solve import evaluate

    variants = {name: split_variant(name) for name in names}
    names = list(dict.fromkeys(base for base, _ in variants.values()))
    models = [m for m in COST_MODELS if m != "profiled"]  # "cfp" is the ILP over profiled costs
    for name in names:
        if name not in ("cfp", *models, *baselines.BASELINES) and not name.endswith(".json"):
            raise CFPError(
                f"Unknown plan {name!r}: use cfp, {', '.join(models)}, {', '.join(baselines.BASELINES)} "
                "or a plan file (.json)."
            )
    files = {name: Plan.load(name) for name in names if name.endswith(".json")}
    graph = analyze_for_profile(spec, mesh)
    skipped = {
        n: baselines.NOT_APPLICABLE[n] for n in names if n in baselines.BASELINES and baselines.choose(n, graph) is None
    }
    if strict and skipped:
        raise CFPError(
            "; ".join(f"The {n} baseline does not apply to this model: {why}" for n, why in skipped.items()) + "."
        )
    choices = {name: _choice_of(plan, graph) for name, plan in files.items()}  # refuses a plan for another model
    profiled = cost_model(graph, "profiled", CostSetup(spec=spec, cluster=None, backend="real", progress=progress))
    # cfp is the ILP's own pick (a plan validated in real steps is benched from its file)
    measured = PlanOptions(cost="profiled", backend="real", memory=memory, validate=0)
    # the other cost models plan for a cluster model: this machine's on CPU, else the H100 models make_plan picks
    local = cluster or ("cpu-gloo-local" if spec.device == "cpu" else None)
    modelled = PlanOptions(memory=memory, cluster=local)
    made = {}
    for name in names:
        if name in skipped:
            continue
        if name == "cfp":
            plan = make_plan(spec, mesh, measured, graph=graph, costs=profiled)[0]
        elif name in models:
            plan = make_plan(spec, mesh, modelled, cost=name, graph=graph)[0]
        elif name in files:
            plan = files[name]
        else:
            plan = make_plan(spec, mesh, measured, memory=None, graph=graph, costs=profiled, baseline=name)[0]
        choice = choices.get(name) or _choice_of(plan, graph)
        configs = [graph.block_strategies(b)[c].config.name for b, c in zip(graph.blocks, choice)]
        optimizer = sum(
            profiled.block_phase_s(graph.class_of(b), c, "optimizer") for b, c in zip(graph.blocks, configs)
        )
        raw = evaluate(graph, uncorrected(profiled), choice, None, *layout_of(plan)).total_s
        ev = evaluate(graph, profiled, choice, None, *layout_of(plan))
        made[name] = BenchPlan(
            Path(name).stem if name in files else name,
            plan,
            ev.total_s,
            optimizer,
            predicted_mem_bytes=ev.memory.total,
            raw_predicted_s=raw,
        )
    runs = []
    for full, (base, variant) in variants.items():
        if base in made:
            name = made[base].name + full[len(base) :]
            runs.append(dataclasses.replace(made[base], name=name, **variant))
    return runs, skipped


# --------------------------------------------------------------------------
# What each rank runs (module level, so spawn can pickle it)
# --------------------------------------------------------------------------


@dataclass
class BenchContext:
    spec: ModelSpec
    device: str
    mesh: object = None  # DeviceMesh, set once the process group exists
    rank: int = 0
    models: list = field(default_factory=list)
    optimizers: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # per model: the batch it trains on


def bench_rank_init(rank: int, world: int, spec: ModelSpec, device_type: str):
    from cfp.profile.real import rank_device

    device = rank_device(device_type)
    return BenchContext(dataclasses.replace(spec, device=device), device), {"rank": rank}


def setup_plans(ctx: BenchContext, plans: list[tuple[dict, bool, bool | None]], lr: float) -> int:
    """Build the model once per plan (same seed, same weights) and parallelize it (lowered, compiled as asked)."""
    from cfp.parallelize import parallelize
    from cfp.spec import build

    for data, lowered, compile in plans:
        workload = build(ctx.spec)
        model = parallelize(
            workload.model,
            Plan.from_json(data),
            mesh=ctx.mesh,
            example_inputs=workload.inputs,
            lowered=lowered,
            compile=compile,
        )
        ctx.models.append(model)
        ctx.optimizers.append(adamw(model.parameters(), lr=lr))
        ctx.inputs.append(_on(ctx.device, workload.inputs))
    return len(ctx.models)


def _on(device: str, inputs: tuple) -> tuple:
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)


def batch_share(inputs: tuple, rank: int, world: int) -> tuple | None:
    """This rank's share of a batch: every tensor input whose dim 0 is the first tensor input's, split evenly
    on it; None where that dim does not split evenly."""
    batched = [isinstance(t, torch.Tensor) and t.ndim > 0 for t in inputs]
    batch = next((t.shape[0] for t, b in zip(inputs, batched) if b), None)
    if batch is None or batch % world:
        return None
    return tuple(t.chunk(world)[rank].contiguous() if b and t.shape[0] == batch else t for t, b in zip(inputs, batched))


def setup_ideal(ctx: BenchContext, lr: float) -> int:
    """The plain model (same seed, same weights) training on this rank's share of the batch: the ideal row."""
    from cfp.spec import build

    workload = build(ctx.spec)
    ctx.models.append(workload.model)
    ctx.optimizers.append(adamw(workload.model.parameters(), lr=lr))
    ctx.inputs.append(batch_share(_on(ctx.device, workload.inputs), ctx.rank, ctx.mesh.size()))
    return len(ctx.models) - 1


def _sync(ctx: BenchContext) -> None:
    if ctx.device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(ctx: BenchContext, i: int) -> dict:
    """One timed training step of plan ``i`` on this rank: forward + backward, then the optimizer."""
    import torch.distributed as dist

    model, opt = ctx.models[i], ctx.optimizers[i]
    _sync(ctx)
    if ctx.mesh is not None:  # the single-process model has no group to wait for
        dist.barrier()
    start = time.perf_counter()
    loss = model(*ctx.inputs[i])
    loss.backward()
    _sync(ctx)
    backward_done = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(ctx)
    end = time.perf_counter()
    return {
        "step_s": end - start,
        "fwd_bwd_s": backward_done - start,
        "optimizer_s": end - backward_done,
        "loss": loss.item(),
    }


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``model``'s parameters, gradients and buffers and ``optimizer``'s state on this rank (each
    storage once: tied weights share one)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = local_tensor(t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_memory(ctx: BenchContext, i: int) -> int:
    """Peak bytes this rank holds during one more training step of plan ``i``."""
    if ctx.device.startswith("cuda"):
        # The allocator's peak counts all this process holds: every plan's weights and optimizer state (the
        # plans share the rank) and the planning copy of the model. Count this plan's, as MemTracker does on CPU.
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - resident_bytes(ctx.models[i], ctx.optimizers[i])
        torch.cuda.reset_peak_memory_stats()
        train_step(ctx, i)
        return int(torch.cuda.max_memory_allocated() - others)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(ctx.models[i], ctx.optimizers[i])
    with tracker:
        train_step(ctx, i)
    return int(sum(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values()))


# --------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------


def measure(
    spec: ModelSpec,
    mesh: MeshSpec,
    plans: list[BenchPlan],
    steps: int,
    warmup: int,
    lr: float = 1e-3,
    timeout_s: float = 600.0,
    on_step: Callable | None = None,
    memory: bool = True,
    single: bool = True,
    ideal: bool = False,
) -> dict[str, dict]:
    """Interleaved training steps of every plan on one worker pool (with ``ideal``, also of the plain
    model on each rank's share of the batch; with ``single``, of the plain model in this process); raw
    results per plan.

    ``cfp bench`` and ``cfp plan --validate`` both time plans with this; ``memory``
    adds the peak-memory step of each plan.
    """
    from cfp.profile.real import WorkerPool

    device_type = "cuda" if str(spec.device).startswith("cuda") else "cpu"
    names = [p.name for p in plans] + ([IDEAL] if ideal else []) + ([SINGLE] if single else [])
    raw = {name: {"steps": [], "peak_mem_bytes": 0} for name in names}
    with WorkerPool(mesh, bench_rank_init, (spec, device_type), device_type, start_timeout_s=timeout_s) as pool:
        setup = [(p.plan.to_json(), p.lowered, p.compile) for p in plans]
        pool.run(setup_plans, (setup, lr), "building the model under every plan", timeout_s)
        if ideal:  # on the ranks, the model after the plans' (index len(plans), as in names)
            pool.run(setup_ideal, (lr,), "building the plain model on each rank's share of the batch", timeout_s)
        alone = _single_context(spec, lr, pool.threads * pool.world) if single else None
        rounds = warmup + steps
        for r, order in enumerate(round_orders(len(names), rounds)):
            for k, i in enumerate(order):
                if names[i] == SINGLE:
                    ranks = [_with_threads(alone.threads, train_step, alone, 0)]
                else:
                    ranks = pool.run(train_step, (i,), f"a training step of the {names[i]} row", timeout_s)
                slowest = max(ranks, key=lambda x: x["step_s"])
                if r == 0:
                    raw[names[i]]["first_loss"] = ranks[0]["loss"]
                if r >= warmup:
                    raw[names[i]]["steps"].append(slowest)
                if on_step:
                    on_step(r * len(names) + k + 1, rounds * len(names))
        on_ranks = [name for name in names if name != SINGLE]  # the pool's models, in order
        for i, name in enumerate(on_ranks if memory else ()):
            raw[name]["peak_mem_bytes"] = max(
                pool.run(peak_memory, (i,), f"measuring the memory of the {name} row", timeout_s)
            )
        if single:
            raw[SINGLE]["peak_mem_bytes"] = _with_threads(alone.threads, peak_memory, alone, 0)
    return raw


def round_orders(n: int, rounds: int, seed: int = 0) -> list[list[int]]:
    """The order of the ``n`` plans in each round: a seeded random permutation per round.

    A fixed cyclic order (rotating only who goes first) puts every plan after
    the same predecessor each round. The step after the ``single`` row pays
    for it: that row's threads have just had both cores, and the ranks were
    idle (on ``gpt:tiny``, mesh 1, the plan after it measured 6.4 ms, the same
    plan elsewhere in the round 4.8 ms).
    """
    rng = random.Random(seed)
    return [rng.sample(range(n), n) for _ in range(rounds)]


def step_stats(steps: list[dict]) -> dict[str, float]:
    """Median and interquartile range of the timed steps of one plan (slowest rank per step)."""
    times = pd.Series([s["step_s"] for s in steps], dtype="float64")
    return {"median_step_s": float(times.median()), "iqr_step_s": float(times.quantile(0.75) - times.quantile(0.25))}


@dataclass
class _Single(BenchContext):
    threads: int = 1


def _single_context(spec: ModelSpec, lr: float, threads: int) -> _Single:
    """The plain model and its AdamW in this process, on the first GPU or the CPU."""
    from cfp.spec import build

    device = "cuda:0" if str(spec.device).startswith("cuda") else "cpu"
    if device == "cpu":  # the host allocator the ranks run with
        keep_freed_host_memory()
    ctx = _Single(dataclasses.replace(spec, device=device), device, threads=threads)
    workload = build(ctx.spec)
    ctx.models.append(workload.model)
    ctx.optimizers.append(adamw(workload.model.parameters(), lr=lr))
    ctx.inputs.append(_on(device, workload.inputs))
    return ctx


def _with_threads(threads: int, fn: Callable, *args):
    """``fn(*args)`` with ``threads`` intra-op threads (the ranks' together), then this process's own again."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def summarize(plans: list[BenchPlan], raw: dict[str, dict]) -> pd.DataFrame:
    rows = []
    rows_of = [(p.name, p) for p in plans] + [(name, None) for name in (IDEAL, SINGLE) if name in raw]
    for name, p in rows_of:
        steps = pd.DataFrame(raw[name]["steps"])
        stats = step_stats(raw[name]["steps"])
        median = stats["median_step_s"]
        predicted = p.predicted_s if p is not None else math.nan  # the cost model predicts parallel plans only
        raw_predicted = p.raw_predicted_s if p is not None else math.nan
        peak = raw[name]["peak_mem_bytes"]
        predicted_mem = p.predicted_mem_bytes if p is not None else 0
        rows.append(
            {
                "plan": name,
                **stats,
                "min_step_s": float(steps["step_s"].min()),
                "max_step_s": float(steps["step_s"].max()),
                "fwd_bwd_s": float(steps["fwd_bwd_s"].median()),
                "optimizer_s": float(steps["optimizer_s"].median()),
                "predicted_step_s": predicted,
                "predicted_optimizer_s": p.predicted_optimizer_s if p is not None else math.nan,
                "prediction_error": predicted / median - 1 if median > 0 else math.nan,
                "raw_predicted_step_s": raw_predicted,
                "raw_prediction_error": raw_predicted / median - 1 if median > 0 else math.nan,
                "peak_mem_bytes": peak,
                "predicted_mem_bytes": predicted_mem,
                "mem_error": predicted_mem / peak - 1 if peak and predicted_mem else math.nan,
                "first_loss": raw[name]["first_loss"] if name != IDEAL else math.nan,  # its share's loss
                "configs": " ".join(f"{c}x{n}" for c, n in p.plan.config_counts().items()) if p is not None else "",
                "layout": " ".join(f"{c}x{n}" for c, n in p.plan.layout_counts().items()) if p is not None else "",
                "steps": len(steps),
            }
        )
    table = pd.DataFrame(rows)
    base = table.loc[table["plan"] == "cfp", "median_step_s"]
    table["ratio_to_cfp"] = table["median_step_s"] / float(base.iloc[0]) if len(base) else math.nan
    single = table.loc[table["plan"] == SINGLE, "median_step_s"]
    table["speedup"] = float(single.iloc[0]) / table["median_step_s"] if len(single) else math.nan
    return table[COLUMNS]


def bench(
    model: str | ModelSpec,
    mesh: str | MeshSpec,
    plans: list[str] | None = None,
    steps: int = 20,
    warmup: int = 3,
    cluster=None,
    lr: float = 1e-3,
    timeout_s: float = 600.0,
    progress=None,
    on_step=None,
    memory=None,
    single: bool = True,
    variants: Sequence[str] = (),
    ideal: bool = True,
) -> BenchResult:
    """``cfp.bench("gpt:small", "2")``: every plan in real interleaved training steps (see the module doc);
    with ``single``, the plain model beside them, and with ``ideal``, the plain model on each rank's share
    of the batch; ``variants`` are more plans to run (``"cfp+interpreted"``)."""
    start = time.perf_counter()
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model), device="cpu")
    if spec.device == "meta":
        spec = dataclasses.replace(spec, device="cpu")
    mesh = parse_mesh(mesh)
    if steps < 1:
        raise CFPError("cfp bench needs at least one timed step per plan (--steps).")
    names = list(dict.fromkeys([*(plans or DEFAULT_PLANS), *variants]))
    made, skipped = make_plans(spec, mesh, names, cluster, progress, strict=plans is not None, memory=memory)
    if not made:
        raise CFPError("No plan to bench.")
    if ideal and (why := _no_ideal(spec, mesh)):
        skipped[IDEAL], ideal = why, False
    raw = measure(spec, mesh, made, steps, warmup, lr, timeout_s, on_step, single=single, ideal=ideal)
    device = torch.cuda.get_device_name(0) if spec.device.startswith("cuda") else "cpu"
    table = summarize(made, raw)
    measured_ideal = table.loc[table["plan"] == IDEAL, "speedup"]
    return BenchResult(
        table,
        spec.describe(),
        mesh,
        device,
        steps,
        time.perf_counter() - start,
        skipped,
        ideal_speedup=float(measured_ideal.iloc[0]) if len(measured_ideal) and single else float(mesh.size),
    )


def _no_ideal(spec: ModelSpec, mesh: MeshSpec) -> str:
    """Why the ideal row cannot run (the batch does not split over the ranks), or ""."""
    from cfp.spec import build

    inputs = build(dataclasses.replace(spec, device="meta")).inputs
    if batch_share(inputs, 0, mesh.size) is None:
        batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.ndim > 0), None)
        return f"the batch ({batch}) does not split evenly over {mesh.size} ranks"
    return ""
