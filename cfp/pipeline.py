"""The whole job, model -> plan: what ``cfp plan`` and ``cfp.plan`` run.

Capture and analyse the model, build the cost model named by
``PlanOptions.cost`` (``cfp.costs.COST_MODELS``), solve the ILP (or cost a
baseline), optionally validate the best plans in real steps, and write the
``Plan`` (``cfp.plan``). ``PlanOptions`` holds every choice and its default,
once: the CLI's flags take their defaults from it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# cfp.analytic and cfp.correction register the built-in cost models (analytic, profiled) as they are imported.
import cfp.analytic  # noqa: F401
import cfp.correction  # noqa: F401
from cfp import baselines as hand
from cfp.analyze import BlockGraph, analyze
from cfp.capture import TracedModel, capture
from cfp.cluster import ClusterModel, load_cluster
from cfp.costs import COST_MODELS, CostModel, CostSetup, measured_here
from cfp.errors import CFPError
from cfp.mesh import MeshSpec, launched_rank, parse_mesh
from cfp.plan import Plan, build_plan
from cfp.profile import analyze_for_profile
from cfp.solve import DEFAULT_TIME_LIMIT_S, Solution, SolveOptions, best_plans, evaluate, solution_for
from cfp.spec import ModelSpec, build
from cfp.validate import DEFAULT_STEPS, check_can_validate, default_k
from cfp.validate import validate as validate_plans


@dataclass(kw_only=True)
class PlanOptions:
    """How a plan is made. These defaults are ``cfp plan``'s and ``cfp.plan``'s alike."""

    cost: str = "profiled"  # a name in cfp.costs.COST_MODELS: profiled or analytic, or one registered
    backend: str = "emulated"  # how profiled costs measure: emulated (a cluster model) or real (this machine)
    cluster: str | ClusterModel | None = None  # a name, a file or a model; None: default_cluster(mesh)
    memory: str | int | None = None  # per-device limit, bytes or "40GiB"; None: the cluster device's memory
    tie_segments: bool = False  # every instance of a repeated block takes the same config
    time_limit_s: float = DEFAULT_TIME_LIMIT_S  # per ILP solve
    baseline: str | None = None  # write this hand-made layout (cfp.baselines) instead of solving
    storage: bool = True  # offer ZeRO-1/2/3 parameter storage to the ILP
    recompute: bool = True  # offer activation recomputation to the ILP
    validate: int | None = None  # K best plans measured in real steps; None: validate.default_k
    validate_steps: int = DEFAULT_STEPS  # timed steps per validated plan
    compile: bool = False  # profile (and validate) the programs compiled by inductor, as parallelize(compile=True) runs
    output: str | Path | None = None  # where rank 0 writes the plan file


UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"40GiB"`` -> 42949672960; ``"80GB"``, ``"1.5TiB"``, ``"8e10"`` and plain numbers (bytes) too."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise CFPError(f"Memory {text!r} is not a size such as 40GiB, 80GB or 1.5TiB.")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def default_cluster(mesh: MeshSpec) -> str:
    """The cluster model a plan assumes when none is named: one H100 node, or two over InfiniBand."""
    return "h100-nvlink-8" if mesh.size <= 8 else "h100-ib-2x8"


def check_cost(name: str) -> None:
    if name not in COST_MODELS:
        raise CFPError(f"Unknown cost model {name!r}; use one of {', '.join(COST_MODELS)}.")


def cost_model(graph: BlockGraph, name: str, setup: CostSetup) -> CostModel:
    """The cost model registered as ``name``, built for ``graph``."""
    check_cost(name)
    return COST_MODELS[name].build(graph, setup)


def resolve_cluster(options: PlanOptions, mesh: MeshSpec) -> ClusterModel | None:
    if isinstance(options.cluster, ClusterModel):
        return options.cluster
    if options.cluster or not measured_here(options.cost, options.backend):
        return load_cluster(options.cluster or default_cluster(mesh))
    return None


def analyse(model, mesh: MeshSpec, options: PlanOptions, on_analysis=None) -> BlockGraph:
    """The BlockGraph of a spec string, ModelSpec or TracedModel; built on a real device if the costs measure."""
    if isinstance(model, TracedModel):
        return analyze(model, mesh, progress=on_analysis)
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model), device="meta")
    if COST_MODELS[options.cost].measures:
        return analyze_for_profile(spec, mesh, progress=on_analysis)
    return analyze(capture(build(spec)), mesh, progress=on_analysis)


def validate_count(options: PlanOptions, mesh: MeshSpec, spec: ModelSpec | None) -> int:
    """How many plans to validate: ``options.validate``, else ``validate.default_k`` (0 for a baseline)."""
    if options.validate is None:
        if options.baseline is not None:
            return 0
        return default_k(options.cost, options.backend, mesh, spec.device if spec is not None else "cpu")
    if options.validate < 0:
        raise CFPError(
            f"--validate {options.validate}: give how many of the best plans to measure (0 turns validation off)."
        )
    if options.validate:
        if options.baseline is not None:
            raise CFPError("--baseline writes one hand-made layout; there is nothing to validate (drop --validate).")
        check_can_validate(options.cost, options.backend, mesh, spec)
    return options.validate


def baseline_solution(graph: BlockGraph, costs: CostModel, name: str, limit: int | None) -> Solution:
    choice = hand.choose(name, graph)
    if choice is None:
        raise CFPError(f"The {name} baseline does not apply to this model: {hand.NOT_APPLICABLE[name]}.")
    return solution_for(graph, costs, choice, f"baseline {name}", limit, hand.storage_levels(name, graph, choice))


def baseline_predictions(graph: BlockGraph, costs: CostModel, limit: int | None) -> dict[str, Any]:
    """Every applicable baseline's predicted step time and memory under ``costs``, for the plan file."""
    out = {}
    for name in hand.BASELINES:
        choice = hand.choose(name, graph)
        if choice is None:
            continue
        ev = evaluate(graph, costs, choice, storage=hand.storage_levels(name, graph, choice))
        if not math.isfinite(ev.total_s):
            continue  # a block of it cannot run (out of memory when profiled): there is no prediction to record
        out[name] = {
            "predicted_step_time_s": ev.total_s,
            "memory_per_device_bytes": ev.memory.total,
            "fits": limit is None or ev.memory.total <= limit,
            "configs": [graph.block_strategies(b)[c].config.name for b, c in zip(graph.blocks, choice)],
        }
    return out


def make_plan(
    model,
    mesh: str | MeshSpec,
    options: PlanOptions | None = None,
    *,
    graph: BlockGraph | None = None,
    costs: CostModel | None = None,
    progress: Callable | None = None,
    on_analysis: Callable | None = None,
    on_validate_step: Callable | None = None,
    **overrides,
) -> tuple[Plan, BlockGraph, Solution]:
    """Capture, analyse, cost and solve; returns ``(plan, graph, solution)`` and writes ``options.output`` if set.

    ``model`` is a spec string, a ModelSpec or a TracedModel; ``mesh`` a string
    such as ``"2x4"`` or a MeshSpec. ``options`` (a ``PlanOptions``) says how;
    its fields may also be given as keywords (``cost="analytic"``), which
    override it. A ``graph`` and ``costs`` already made are used as they are.
    ``progress(done, cached, total, job)`` reports profiling,
    ``on_analysis(done, total)`` the analysis (configs propagated) and
    ``on_validate_step(done, total)`` validation.
    """
    options = dataclasses.replace(options or PlanOptions(), **overrides)
    mesh = parse_mesh(mesh)
    check_cost(options.cost)
    if options.compile and (options.cost != "profiled" or options.backend != "real"):
        raise CFPError(
            "--compile profiles the programs compiled by inductor, on this machine: it needs --cost profiled "
            f"--backend real (this plan: --cost {options.cost} --backend {options.backend})."
        )
    cluster = resolve_cluster(options, mesh)
    if graph is None:
        graph = analyse(model, mesh, options, on_analysis)
    spec = graph.traced.spec
    if costs is None:
        runtime = "compiled" if options.compile else "lowered"
        setup = CostSetup(spec=spec, cluster=cluster, backend=options.backend, progress=progress, runtime=runtime)
        costs = cost_model(graph, options.cost, setup)
    limit = parse_bytes(options.memory) if options.memory is not None else getattr(cluster, "memory_bytes", None)
    validate = validate_count(options, mesh, spec)
    solve_options = SolveOptions(
        memory_limit=limit,
        tie_segments=options.tie_segments,
        time_limit_s=options.time_limit_s,
        storage=options.storage,
        recompute=options.recompute,
    )
    if options.baseline is not None:
        solutions = [baseline_solution(graph, costs, options.baseline, limit)]
    else:
        solutions = best_plans(graph, costs, max(validate, 1), solve_options)
    baselines = baseline_predictions(graph, costs, limit)
    prov = {"cluster": getattr(cluster, "name", None), "analysis_seconds": round(graph.seconds, 2)}
    if validate:
        checked = validate_plans(
            spec,
            graph,
            costs,
            solutions,
            limit,
            lambda s: build_plan(graph, costs, s, baselines, prov),
            options.validate_steps,
            on_step=on_validate_step,
            rivals=analytic_rival(graph, spec, mesh, cluster, costs, solve_options)
            if options.cost != "analytic"
            else {},
            compile=options.compile,
        )
        solution, plan = checked.chosen.solution, checked.chosen.plan
        plan.validation = checked.to_json()
    else:
        solution = solutions[0]
        plan = build_plan(graph, costs, solution, baselines, prov)
    if options.output is not None and launched_rank() == 0:
        plan.save(options.output)
    return plan, graph, solution


def analytic_rival(graph, spec, mesh, cluster, costs, options: SolveOptions) -> dict[str, Solution]:
    """The analytic planner's plan, priced by ``costs``, for validation to measure beside the ILP's own.

    Alpa-style costs rank plans otherwise than profiles do (on the tiny examples they keep every block
    replicated, which wins on 2 gloo ranks), and a validated plan should beat that planner too. It plans for
    ``cluster``, else this machine's model on CPU (``cpu-gloo-local``, as ``cfp bench``), else the default one.
    """
    name = cluster or ("cpu-gloo-local" if spec.device == "cpu" else default_cluster(mesh))
    setup = CostSetup(spec=spec, cluster=load_cluster(name) if isinstance(name, str) else name, backend="emulated")
    try:
        found = best_plans(graph, cost_model(graph, "analytic", setup), 1, options)[0]
    except CFPError:  # no plan fits under its costs: nothing to measure
        return {}
    limit = options.memory_limit
    return {"analytic": solution_for(graph, costs, found.choice, "analytic", limit, found.storage, found.recompute)}


def plan(model, mesh, options: PlanOptions | None = None, **kwargs) -> Plan:
    """``cfp.plan("gpt:small", "2x2", memory="40GiB", cost="analytic")``: the Plan (see make_plan and PlanOptions)."""
    return make_plan(model, mesh, options, **kwargs)[0]
