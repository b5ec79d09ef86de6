"""Validation: the best predicted plans run for a few real training steps before one is written.

Predicted step times are a few percent off, enough to flip close rankings.
``cfp plan --validate K`` therefore takes the ILP's K best distinct plans
(``cfp.solve.best_plans``), adds every baseline of ``cfp.baselines`` that
applies and fits in memory, times them all with ``cfp.bench.measure`` (one
worker pool, plans round-robin, a step from a barrier to the end of the
optimizer step, the slowest rank's) and writes the plan with the lowest
median step time. Its cost is one pool start plus ``(steps + warmup)`` steps
of each candidate, so it grows with K times the steps.

The plan file records every candidate under ``validation`` (see
``Validation.to_json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cfp.costs import COST_MODELS, measured_here
from cfp.errors import CFPError
from cfp.mesh import MeshSpec, launched_world
from cfp.plan import Plan
from cfp.solve import Solution, solution_for
from cfp.spec import ModelSpec

DEFAULT_K = 3
DEFAULT_STEPS = 6
DEFAULT_WARMUP = 2
# Short steps are noisy: each candidate runs at least MIN_TIMED_S of (predicted) timed steps, up to MAX_STEPS. Six
# steps of gpt:tiny (6-10 ms each) ranked two plans the opposite way from a 20-step bench measuring them 2x apart.
MIN_TIMED_S = 0.5
MAX_STEPS = 50


def mesh_fits_here(mesh: MeshSpec, device: str) -> bool:
    """One process per rank on this machine: a GPU each, or a CPU core each."""
    from cfp.profile.real import cpu_cores

    if str(device).startswith("cuda"):
        return torch.cuda.device_count() >= mesh.size
    return cpu_cores() >= mesh.size


def default_k(cost: str, backend: str, mesh: MeshSpec, device: str) -> int:
    """``DEFAULT_K`` where real steps can run here and mean something; else 0 (no validation).

    That is profiled costs on the real backend, a mesh this machine holds, and
    not inside a ``torchrun`` job. Emulated and analytic costs model another
    cluster, whose steps cannot be measured on this machine.
    """
    real = measured_here(cost, backend)
    return DEFAULT_K if real and launched_world() <= 1 and mesh_fits_here(mesh, device) else 0


def check_can_validate(cost: str, backend: str, mesh: MeshSpec, spec: ModelSpec | None) -> None:
    if not measured_here(cost, backend):
        raise CFPError(
            "--validate measures plans on this machine, so it needs costs profiled on it "
            "(--cost profiled --backend real); "
            f"these are {cost} costs{' on the ' + backend + ' backend' if COST_MODELS[cost].measures else ''}, "
            "a model of another cluster."
        )
    if launched_world() > 1:
        raise CFPError("--validate starts its own ranks; run `cfp plan --validate K` outside torchrun.")
    if spec is None:
        raise CFPError("--validate rebuilds the model on every rank from its spec; this model was given without one.")
    if not mesh_fits_here(mesh, spec.device):
        raise CFPError(f"--validate runs one process per rank, and mesh {mesh} does not fit on this machine.")


@dataclass
class Candidate:
    name: str  # cfp-1 .. cfp-K (ILP rank), or a baseline's name
    solution: Solution
    plan: Plan | None = None
    median_step_s: float = math.nan
    iqr_step_s: float = math.nan
    steps: int = 0
    chosen: bool = False
    why: str = ""
    raw_predicted_s: float = math.nan  # without the prediction correction
    corrected_s: float = math.nan  # under the correction refitted with this validation's measurements

    @property
    def predicted_s(self) -> float:
        return self.solution.evaluation.total_s

    def to_json(self) -> dict:
        counts: dict[str, int] = {}
        for c in self.plan.blocks if self.plan else ():
            counts[c["config"]] = counts.get(c["config"], 0) + 1
        return {
            "name": self.name,
            "configs": " ".join(f"{c}x{n}" for c, n in counts.items()),
            "predicted_step_time_s": self.predicted_s,
            "measured_step_time_s": None if math.isnan(self.median_step_s) else self.median_step_s,
            "iqr_step_time_s": None if math.isnan(self.iqr_step_s) else self.iqr_step_s,
            "raw_predicted_step_time_s": None if math.isnan(self.raw_predicted_s) else self.raw_predicted_s,
            "corrected_step_time_s": None if math.isnan(self.corrected_s) else self.corrected_s,
            "steps": self.steps,
            "chosen": self.chosen,
            "why": self.why,
        }


@dataclass
class Validation:
    candidates: list[Candidate]
    steps: int
    warmup: int
    wall_s: float
    extra: dict = field(default_factory=dict)  # what later stages add (the prediction correction)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)

    def to_json(self) -> dict:
        return {
            "chosen": self.chosen.name,
            "steps": self.steps,
            "warmup": self.warmup,
            "wall_s": round(self.wall_s, 2),
            "candidates": [c.to_json() for c in self.candidates],
            **self.extra,
        }


def candidates(
    graph, costs, solutions: list[Solution], memory_limit: int | None, rivals: dict[str, Solution] | None = None
) -> list[Candidate]:
    """The ILP's plans in rank order, then ``rivals`` (other planners' plans, by name), then every baseline; one
    already among them, or too big, is noted, not run."""
    from cfp import baselines
    from cfp.report_util import human_bytes

    def layout(solution: Solution) -> tuple:
        n = len(solution.choice)
        return (
            tuple(solution.choice),
            tuple(solution.storage or ["replicate"] * n),
            tuple(solution.recompute or [False] * n),
        )

    out = [Candidate(f"cfp-{i}", s) for i, s in enumerate(solutions, start=1)]
    seen = {layout(c.solution): c.name for c in out}
    others = dict(rivals or {})
    for name in baselines.BASELINES:
        choice = baselines.choose(name, graph)
        if choice is not None:
            levels = baselines.storage_levels(name, graph, choice)
            others[name] = solution_for(graph, costs, choice, f"baseline {name}", memory_limit, levels)
    for name, solution in others.items():
        cand = Candidate(name, solution)
        mem = cand.solution.evaluation.memory.total
        if layout(cand.solution) in seen:
            cand.why = f"not run: the same layout as {seen[layout(cand.solution)]}"
        elif memory_limit is not None and mem > memory_limit:
            cand.why = f"not run: needs {human_bytes(mem)} per device, over the {human_bytes(memory_limit)} limit"
        else:
            seen[layout(cand.solution)] = name
        out.append(cand)
    return out


def validate(
    spec: ModelSpec,
    graph,
    costs,
    solutions: list[Solution],
    memory_limit: int | None,
    make: Callable[[Solution], Plan],
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    on_step: Callable | None = None,
    rivals: dict[str, Solution] | None = None,
    compile: bool = False,
) -> Validation:
    """Time every candidate in real steps and choose the fastest median; ``make`` turns a Solution into a Plan.
    ``steps`` is the least; short steps get more (``MIN_TIMED_S``, ``MAX_STEPS``).
    ``rivals``: other planners' plans (priced by ``costs``) to measure beside the ILP's and the baselines.
    ``compile``: the candidates run compiled by inductor; their pairs teach no correction (it is of lowered steps)."""
    from cfp.bench import BenchPlan, measure, step_stats

    if steps < 1:
        raise CFPError("Validation needs at least one timed step per plan.")
    start = time.perf_counter()
    cands = candidates(graph, costs, solutions, memory_limit, rivals)
    for c in cands:
        c.plan = make(c.solution)
    run = [c for c in cands if not c.why]
    fastest = min((c.predicted_s for c in run if c.predicted_s > 0), default=math.inf)
    steps = max(steps, min(MAX_STEPS, math.ceil(MIN_TIMED_S / fastest))) if math.isfinite(fastest) else steps
    device_spec = dataclasses.replace(spec, device="cpu") if spec.device == "meta" else spec
    bench_plans = [BenchPlan(c.name, c.plan, c.predicted_s, math.nan, compile=compile) for c in run]
    raw = measure(device_spec, graph.mesh, bench_plans, steps, warmup, on_step=on_step, memory=False, single=False)
    for c in run:
        stats = step_stats(raw[c.name]["steps"])
        c.median_step_s, c.iqr_step_s, c.steps = stats["median_step_s"], stats["iqr_step_s"], len(raw[c.name]["steps"])
    best = min(run, key=lambda c: c.median_step_s)
    best.chosen = True
    first = cands[0]
    for c in run:
        if c is best:
            gain = first.median_step_s / best.median_step_s - 1
            c.why = "fastest measured median" + (
                "" if c is first else f", {gain:.1%} faster than the ILP's first plan (cfp-1)"
            )
        else:
            inside = " (inside its IQR)" if c.median_step_s - best.median_step_s <= best.iqr_step_s else ""
            c.why = f"{c.median_step_s / best.median_step_s:.2f}x the chosen plan's median{inside}"
    extra = {"correction": learn(device_spec, graph, costs, cands, run)} if _profiled(costs) and not compile else {}
    return Validation(cands, steps, warmup, time.perf_counter() - start, extra)


def _profiled(costs) -> bool:
    """Only profiled costs teach the correction (a hand-made cost model's errors are not the profiles')."""
    from cfp.correction import uncorrected
    from cfp.profile import ProfileTable

    return isinstance(uncorrected(costs), ProfileTable)


def _errors(predicted: list[float], measured: list[float]) -> dict[str, float]:
    errs = [p / m - 1 for p, m in zip(predicted, measured)]
    return {
        "mean_abs": sum(map(abs, errs)) / len(errs),
        "max_abs": max(map(abs, errs)),
        "rms": math.sqrt(sum(e * e for e in errs) / len(errs)),  # what the correction's least squares minimises
    }


def learn(spec: ModelSpec, graph, costs, cands: list[Candidate], run: list[Candidate]) -> dict:
    """Store the measured candidates' pairs beside the profiles, refit the correction, report the error before/after."""
    from cfp.correction import (
        Correction,
        ValidationStore,
        features,
        store_key,
        uncorrected,
    )

    raw = uncorrected(costs)
    key = store_key(graph, "real", spec.device)
    feats = {c.name: features(graph, raw, c.solution) for c in cands}
    for c in cands:
        c.raw_predicted_s = sum(feats[c.name].values())
    store = ValidationStore()
    store.add(
        [
            {
                **key,
                "model": spec.describe(),
                "plan": c.name,
                "features": json.dumps(feats[c.name]),
                "predicted_s": c.raw_predicted_s,
                "measured_s": c.median_step_s,
                "iqr_s": c.iqr_step_s,
                "steps": c.steps,
                "measured_at": time.time(),
            }
            for c in run
        ]
    )
    rows = store.rows(key)
    fit = Correction.choose(rows)
    for c in cands:
        c.corrected_s = fit.predict(feats[c.name]) if fit is not None else c.raw_predicted_s
    measured = [c.median_step_s for c in run]
    return {
        **(fit if fit is not None else Correction(pairs=len(rows), runs=rows["run"].nunique())).to_json(),
        "applied": fit is not None,
        "store": str(store.dir),
        "error_before": _errors([c.raw_predicted_s for c in run], measured),
        "error_after": _errors([c.corrected_s for c in run], measured),
    }
