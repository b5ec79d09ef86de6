"""The plan file: versioned JSON that a training script loads.

Top-level keys (``schema_version`` 1):

- ``model``: ``spec`` (the model spec and its factory arguments) and ``fingerprint``;
- ``mesh``: ``shape`` and ``names``;
- ``parameters``: every parameter FQN (tied aliases included) -> its
  placements, one string per mesh dimension (``"Shard(0)"``, ``"Replicate()"``,
  as ``cfp.placements.to_str`` writes them);
- ``storage``: every parameter stored apart from where it computes (FQN ->
  ``level``, one of ``zero1``/``zero2``/``zero3``, and its storage
  ``placements``; see cfp.storage); parameters not listed are stored as
  ``parameters`` says;
- ``blocks``: per block its id, anchor, class, config, the entry placements
  of each external input, its ``storage`` level and whether it is
  ``recompute``d, with its predicted time;
- ``predicted_step_time_s`` (seconds) and ``time_breakdown_s`` (blocks,
  transitions, and compute/communication where the cost model splits them);
- ``memory_per_device_bytes``: total, limit and params/grads/optimizer/activations;
- ``solve``: seconds, status, gap, objective (seconds);
- ``baselines``: the same cost model's prediction for e.g. data parallel;
- ``validation`` (plans made with ``--validate``): every candidate measured in
  real steps, its predicted and measured step time, and why one was chosen
  (see ``cfp.validate``);
- ``provenance``: cost model, backend, device, cluster, torch and cfp versions.

In memory a ``Plan`` holds DTensor placements (``cfp.placements.Placements``)
wherever the file holds placement strings; ``from_json`` and ``to_json``
convert.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cfp.errors import CFPError
from cfp.mesh import launched_rank
from cfp.placements import Placements, from_str, is_sharded, normalize, replicated, to_str, to_strs

SCHEMA_VERSION = 1
REQUIRED = (
    "schema_version",
    "model",
    "mesh",
    "parameters",
    "blocks",
    "predicted_step_time_s",
    "memory_per_device_bytes",
    "solve",
    "provenance",
)


@dataclass
class Plan:
    model: dict[str, Any]  # {"spec": ..., "fingerprint": ...}
    mesh: dict[str, Any]  # {"shape": [...], "names": [...]}
    parameters: dict[str, Placements]
    blocks: list[dict[str, Any]]  # as in the file, but each input's "placements" are Placements (or None)
    predicted_step_time_s: float
    time_breakdown_s: dict[str, Any]
    memory_per_device_bytes: dict[str, Any]
    solve: dict[str, Any]
    provenance: dict[str, Any]
    baselines: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)  # FQN -> {"level", "placements": Placements}
    validation: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # -- file -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "mesh": self.mesh,
            "parameters": {fqn: to_strs(pl) for fqn, pl in self.parameters.items()},
            "storage": {fqn: {**s, "placements": to_strs(s.get("placements"))} for fqn, s in self.storage.items()},
            "blocks": [_with_input_placements(b, lambda placements, _: to_strs(placements)) for b in self.blocks],
            "predicted_step_time_s": self.predicted_step_time_s,
            "time_breakdown_s": self.time_breakdown_s,
            "memory_per_device_bytes": self.memory_per_device_bytes,
            "solve": self.solve,
            "baselines": self.baselines,
            "validation": self.validation,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            text = json.dumps(self.to_json(), indent=1, allow_nan=False)  # bare NaN/Infinity is not JSON
        except ValueError:
            where = ", ".join(non_finite(self.to_json())[:3])
            raise CFPError(
                f"The plan holds non-finite numbers ({where}), which JSON cannot carry; {path} was not written. "
                f"A profile row or cost behind them is invalid: re-measure with `cfp profile`."
            ) from None
        path.write_text(text + "\n")

    @classmethod
    def from_json(cls, data: Any, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise CFPError(f"{source} is not a CFP plan: expected a JSON object, found {type(data).__name__}.")
        version = data.get("schema_version")
        if isinstance(version, (str, float)):
            raise CFPError(
                f"{source} has schema_version {version!r} ({type(version).__name__}); it must be the integer "
                f"{SCHEMA_VERSION}. Was the file edited by hand? Re-create the plan with `cfp plan`."
            )
        if version != SCHEMA_VERSION:
            raise CFPError(
                f"{source} has plan schema version {version!r}; this CFP ({__import__('cfp').__version__}) reads "
                f"version {SCHEMA_VERSION}. Re-create the plan with `cfp plan`."
            )
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise CFPError(f"{source} is damaged: it lacks {', '.join(missing)}. Re-create the plan with `cfp plan`.")
        try:
            if not isinstance(data["parameters"], dict) or not all(
                isinstance(v, list) for v in data["parameters"].values()
            ):
                raise TypeError("parameters must map names to lists of placements")
            if not isinstance(data["blocks"], list):
                raise TypeError("blocks must be a list")
            check_mesh(data["mesh"])
            ndim = len(data["mesh"]["shape"])
            parameters = {}
            for fqn, pl in data["parameters"].items():
                if len(pl) != ndim:
                    raise ValueError(f"parameter {fqn} has {len(pl)} placements for a {ndim}-D mesh")
                parameters[fqn] = parse_placements(pl, f"parameter {fqn}")
            blocks = [_with_input_placements(b, parse_placements) for b in data["blocks"]]
            if not isinstance(data.get("storage") or {}, dict):
                raise TypeError("storage must map names to a level and placements")
            storage = {
                fqn: {**s, "placements": parse_placements(s.get("placements"), f"the storage of {fqn}")}
                for fqn, s in (data.get("storage") or {}).items()
            }
            return cls(
                model=dict(data["model"]),
                mesh={"shape": list(data["mesh"]["shape"]), "names": list(data["mesh"]["names"])},
                parameters=parameters,
                blocks=blocks,
                predicted_step_time_s=float(data["predicted_step_time_s"]),
                time_breakdown_s=data.get("time_breakdown_s", {}),
                memory_per_device_bytes=dict(data["memory_per_device_bytes"]),
                solve=dict(data["solve"]),
                provenance=dict(data["provenance"]),
                baselines=data.get("baselines", {}),
                storage=storage,
                validation=data.get("validation", {}),
            )
        except (KeyError, TypeError, ValueError, CFPError) as exc:
            why = str(exc) if isinstance(exc, CFPError) else f"{type(exc).__name__}: {exc}"
            raise CFPError(f"{source} is damaged: {why}. Re-create the plan with `cfp plan`.") from exc

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise CFPError(f"Plan file {path} does not exist.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CFPError(
                f"Plan file {path} is damaged (not valid JSON: {exc}). Re-create it with `cfp plan`."
            ) from exc
        return cls.from_json(data, f"Plan file {path}")

    # -- use --------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.model.get("fingerprint", "")

    def check_matches(self, traced) -> None:
        """Refuse a plan made for another model (graph structure, shapes or parameter names differ), or one whose
        placements or configs that model cannot take (an edited file)."""
        actual = traced.fingerprint()
        if actual != self.fingerprint:
            made_for = self.model.get("spec", {})
            raise CFPError(
                f"This plan was made for a different model: its fingerprint is {self.fingerprint}, the model's is "
                f"{actual}. The plan was made for {made_for.get('describe', made_for)}; shapes (batch, sequence, "
                f"sizes), structure or parameter names differ. Re-run `cfp plan` for this model."
            )
        self._check_parameters(traced)
        self._check_configs(traced)

    def _check_parameters(self, traced) -> None:
        """Every parameter has placements its rank allows; Shard(7) on a matrix is named here, not by DTensor."""
        shapes = traced.param_shapes()
        for fqn, shape in shapes.items():
            placements = self.parameters.get(fqn)
            if placements is None:
                raise CFPError(
                    f"The plan gives no placements for parameter {fqn}; was the file edited? Re-run `cfp plan`."
                )
            for mesh_dim, placement in enumerate(placements):
                if is_sharded(placement) and placement.dim >= len(shape):
                    raise CFPError(
                        f"The plan shards parameter {fqn} (shape {tuple(shape)}) on dimension {placement.dim} "
                        f"({to_str(placement)} on mesh dimension {mesh_dim}); it has only {len(shape)}. "
                        "Was the file edited? Re-run `cfp plan`."
                    )
        unknown = sorted(set(self.parameters) - set(shapes) - set(traced.aliases))
        if unknown:
            raise CFPError(
                f"The plan gives placements for {', '.join(unknown[:3])}, which the model does not have. "
                "Re-run `cfp plan`."
            )

    def _check_configs(self, traced) -> None:
        """Every block's config is one the model's block offers (by name), so what trains is what was planned."""
        from cfp.blocks import partition
        from cfp.configs import candidates

        blocks = partition(traced)
        if len(blocks) != len(self.blocks):
            raise CFPError(
                f"The plan has {len(self.blocks)} blocks but the model cuts into {len(blocks)}; "
                "re-run `cfp plan` for this model."
            )
        shape = tuple(self.mesh["shape"])
        for block, entry in zip(blocks, self.blocks):
            names = [c.name for c in candidates(block, traced, shape)]
            if entry.get("config") not in names:
                raise CFPError(
                    f"Plan block {block.id} ({block.anchor}) has config {entry.get('config')!r}, which this block does "
                    f"not offer on mesh {'x'.join(map(str, shape))} (it offers {', '.join(names)}). "
                    f"Was the file edited? Re-run `cfp plan`."
                )

    def layout_counts(self) -> dict[str, int]:
        """How many blocks store their parameters at each level, and recompute."""
        out: dict[str, int] = {}
        for b in self.blocks:
            level = b.get("storage", "replicate")
            if level != "replicate":
                out[level] = out.get(level, 0) + 1
            if b.get("recompute"):
                out["recompute"] = out.get("recompute", 0) + 1
        return out

    def config_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.blocks:
            out[b["config"]] = out.get(b["config"], 0) + 1
        return out


def non_finite(value: Any, path: str = "") -> list[str]:
    """Paths (``baselines.dp.predicted_step_time_s``) of NaN or infinite numbers in a JSON-like value."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{path or 'value'} = {value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    return []


def check_mesh(mesh: Any) -> None:
    shape, names = mesh["shape"], mesh["names"]
    if not (
        isinstance(shape, list)
        and shape
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise ValueError(f"mesh shape {shape!r} is not a list of positive integers")
    if not isinstance(names, list) or len(names) != len(shape):
        raise ValueError(f"mesh names {names!r} do not match its shape {shape}")


def _with_input_placements(block: dict[str, Any], convert) -> dict[str, Any]:
    """A plan's block with each input's placements replaced by ``convert(placements, which input)``."""
    if "inputs" not in block:
        return block
    where = f"block {block.get('id')} input "
    return {
        **block,
        "inputs": [
            {**i, "placements": convert(i.get("placements"), where + str(i.get("name")))} for i in block["inputs"]
        ],
    }


def parse_placements(texts: Any, what: str) -> Placements | None:
    """A file's placement strings, parsed, with non-negative shard dimensions (the rank is checked against the
    model); None stays None."""
    if texts is None:
        return None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what} has placements {texts!r}, not a list of strings")
    out = []
    for text in texts:
        try:
            placement = from_str(text)
        except (CFPError, ValueError) as exc:
            raise ValueError(
                f"{what} has placement {text!r}, which is not Shard(d), Replicate() or Partial(op)"
            ) from exc
        if is_sharded(placement) and placement.dim < 0:
            raise ValueError(f"{what} has placement {text!r}: a shard dimension cannot be negative")
        out.append(placement)
    return tuple(out)


# --------------------------------------------------------------------------
# Building a plan from a solution
# --------------------------------------------------------------------------


def parameter_placements(graph, choice: list[int]) -> dict[str, Placements]:
    """Every parameter FQN -> placements, from the chosen configs' entry placements (aliases included)."""
    traced = graph.traced
    out: dict[str, list[str]] = {}
    for block, c in zip(graph.blocks, choice):
        prop = graph.block_configs(block)[c]
        for pos, inp in enumerate(block.inputs):
            fqn = traced.params.get(inp.name)
            if fqn is None or fqn in out:
                continue
            pl = prop.input_placements[pos]
            out[fqn] = normalize(pl) if pl is not None else replicated(graph.mesh.ndim)
    for fqn in traced.params.values():  # parameters no block reads stay replicated
        out.setdefault(fqn, replicated(graph.mesh.ndim))
    for alias, canonical in traced.aliases.items():
        out[alias] = out[canonical]
    return out


def spec_json(spec) -> dict:
    if spec is None:
        return {}
    return {
        "spec": spec.spec,
        "batch": spec.batch,
        "seq": spec.seq,
        "args": dict(spec.args),
        "describe": spec.describe(),
    }


def block_entry(graph, block, prop) -> dict[str, Any]:
    """What the plan file records of one block under its chosen config."""
    return {
        "id": block.id,
        "anchor": block.anchor,
        "op": str(graph.traced.nodes[block.anchor].target).replace(".default", ""),
        "class": block.class_id,
        "config": prop.config.name,
        "params": list(block.params),
        "inputs": [
            {"name": i.name, "role": i.role, "producer": i.producer, "placements": normalize(p)}
            for i, p in zip(block.inputs, prop.input_placements)
        ],
    }


def build_plan(
    graph, costs, solution, baselines: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None
) -> Plan:
    """A Plan from a BlockGraph, the cost model used and the ILP's Solution."""
    import cfp
    from cfp.storage import StorageTable

    traced = graph.traced
    ev = solution.evaluation
    levels = solution.storage or ["replicate"] * len(graph.blocks)
    recompute = solution.recompute or [False] * len(graph.blocks)
    blocks = []
    compute_total = comm_total = 0.0
    split = hasattr(costs, "block_cost")
    for block, c in zip(graph.blocks, solution.choice):
        prop = graph.block_configs(block)[c]
        entry = {
            **block_entry(graph, block, prop),
            "time_s": ev.block_s[block.id],
            "transition_in_s": ev.transition_in_s[block.id],
            "activation_bytes": int(prop.activation_bytes),
            "communication_free": prop.comm_free,
            "storage": levels[block.id],
            "recompute": bool(recompute[block.id]),
        }
        if split:
            bc = costs.block_cost(block.class_id, prop.config.name)
            entry["compute_s"], entry["communication_s"] = bc.compute_s, bc.communication_s
            compute_total += bc.compute_s
            comm_total += bc.communication_s
        blocks.append(entry)
    breakdown = {"blocks": ev.blocks_total_s, "transitions": ev.transitions_total_s}
    if split:
        breakdown.update({"compute": compute_total, "communication": comm_total})
    memory = ev.memory.to_json()
    memory["limit"] = solution.memory_limit
    prov = {"cost_model": costs.name, "torch": torch.__version__, "cfp": cfp.__version__}
    if hasattr(costs, "describe"):
        prov.update({k: v for k, v in costs.describe().items() if k != "name"})
    prov.update(provenance or {})
    return Plan(
        model={
            "spec": spec_json(traced.spec),
            "fingerprint": traced.fingerprint(),
            "parameters": traced.num_parameters(),
        },
        mesh=graph.mesh.to_json(),
        parameters=parameter_placements(graph, solution.choice),
        storage=StorageTable(graph).parameter_storage(solution.choice, levels),
        blocks=blocks,
        predicted_step_time_s=ev.total_s,
        time_breakdown_s=breakdown,
        memory_per_device_bytes=memory,
        solve=solution.to_json(),
        provenance=prov,
        baselines=baselines or {},
    )


# --------------------------------------------------------------------------
# The whole job: model -> plan (what `cfp plan` runs)
# --------------------------------------------------------------------------

COSTS = ("profiled", "analytic")
_UNITS = {
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
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise CFPError(f"Memory {text!r} is not a size such as 40GiB, 80GB or 1.5TiB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_cluster(mesh) -> str:
    """The cluster model a plan assumes when none is named: one H100 node, or two over InfiniBand."""
    return "h100-nvlink-8" if mesh.size <= 8 else "h100-ib-2x8"


def cost_model(graph, cost: str, cluster=None, backend: str = "emulated", spec=None, progress=None):
    """The CostModel for ``--cost``: ``analytic`` (FLOPs + alpha-beta) or ``profiled`` (cfp.profile)."""
    if cost == "analytic":
        from cfp.analytic import AnalyticCosts

        if cluster is None:
            raise CFPError("The analytic cost model needs a cluster model (--cluster NAME or FILE).")
        return AnalyticCosts(graph, cluster)
    if cost == "profiled":
        try:
            from cfp.profile import profile
        except ImportError as exc:
            raise CFPError(
                f"Profiled costs are not available in this installation ({exc}); use --cost analytic."
            ) from exc
        run = profile(
            graph,
            spec if spec is not None else graph.traced.spec,
            backend=backend,
            cluster=cluster,
            on_progress=progress,
        )
        table = run.table
        table.describe = lambda: {
            "backend": backend,
            "device": getattr(cluster, "device_kind", "local") if backend == "emulated" else "local",
            "cluster": getattr(cluster, "name", None),
            "profile_store": run.store,
            "profile_jobs": run.jobs,
        }
        from cfp.correction import corrected

        return corrected(table, graph, backend, (spec if spec is not None else graph.traced.spec).device)
    raise CFPError(f"Unknown cost model {cost!r}; use one of {', '.join(COSTS)}.")


def make_plan(
    model,
    mesh,
    memory: str | int | None = None,
    cost: str = "analytic",
    backend: str = "emulated",
    cluster=None,
    tie_segments: bool = False,
    output: str | Path | None = None,
    time_limit_s: float | None = None,
    graph=None,
    progress=None,
    baseline: str | None = None,
    costs=None,
    storage: bool = True,
    recompute: bool = True,
    validate: int | None = None,
    validate_steps: int | None = None,
    on_validate_step=None,
    on_analysis=None,
) -> tuple[Plan, Any, Any]:
    """Capture, analyse, cost and solve; returns ``(plan, graph, solution)`` and writes ``output`` if given.

    ``model`` is a spec string, a ModelSpec or a TracedModel; ``mesh`` a string
    such as ``"2x4"`` or a MeshSpec; ``memory`` bytes or a size string (default:
    the cluster device's memory); ``cluster`` a name, a file or a ClusterModel.
    ``baseline`` (``dp``, ``megatron``, ``expert``; see cfp.baselines) writes
    that hand-made layout instead of solving, costed the same way. A
    ``graph`` and ``costs`` already made are used as they are. ``storage``
    and ``recompute`` let the ILP store parameters ZeRO-sharded and recompute
    activations (cfp.storage).

    ``validate`` K: run the K best ILP plans and the baselines that fit for
    ``validate_steps`` real training steps and write the fastest (cfp.validate).
    The default (None) is 3 for profiled costs on the real backend with a mesh
    this machine holds, else 0 (off); ``on_validate_step(done, total)`` reports
    its progress; ``on_analysis(done, total)`` that of the analysis (configs propagated).
    """
    from cfp import baselines as hand
    from cfp.analyze import analyze
    from cfp.capture import TracedModel, capture
    from cfp.cluster import ClusterModel, load_cluster
    from cfp.mesh import parse_mesh
    from cfp.solve import DEFAULT_TIME_LIMIT_S, best_plans, evaluate, fixed
    from cfp.spec import ModelSpec, build
    from cfp.validate import DEFAULT_STEPS, check_can_validate, default_k
    from cfp.validate import validate as validate_plans

    mesh = parse_mesh(mesh)
    if cost not in COSTS:
        raise CFPError(f"Unknown cost model {cost!r}; use one of {', '.join(COSTS)}.")
    if not isinstance(cluster, ClusterModel):
        cluster = (
            load_cluster(cluster or default_cluster(mesh))
            if (cluster or cost == "analytic" or backend == "emulated")
            else None
        )
    spec = None
    if graph is None:
        if isinstance(model, TracedModel):
            traced = model
        else:
            spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model), device="meta")
            if cost == "profiled":
                from cfp.profile import analyze_for_profile

                graph = analyze_for_profile(spec, mesh, progress=on_analysis)
            else:
                traced = capture(build(spec))
        if graph is None:
            graph = analyze(traced, mesh, progress=on_analysis)
    spec = spec or graph.traced.spec
    costs = costs if costs is not None else cost_model(graph, cost, cluster, backend, spec, progress)
    limit = parse_bytes(memory) if memory is not None else (cluster.memory_bytes if cluster is not None else None)
    if validate is None:
        validate = 0 if baseline is not None else default_k(cost, backend, mesh, spec.device if spec else "cpu")
    if validate < 0:
        raise CFPError(f"--validate {validate}: give how many of the best plans to measure (0 turns validation off).")
    if validate:
        if baseline is not None:
            raise CFPError("--baseline writes one hand-made layout; there is nothing to validate (drop --validate).")
        check_can_validate(cost, backend, mesh, spec)
    if baseline is not None:
        choice = hand.choose(baseline, graph)
        if choice is None:
            raise CFPError(f"The {baseline} baseline does not apply to this model: {hand.NOT_APPLICABLE[baseline]}.")
        solution = fixed(
            graph, costs, choice, f"baseline {baseline}", limit, hand.storage_levels(baseline, graph, choice)
        )
    else:
        time_limit_s = time_limit_s or DEFAULT_TIME_LIMIT_S
        solutions = best_plans(
            graph, costs, max(validate, 1), limit, tie_segments, time_limit_s, storage=storage, recompute=recompute
        )
        solution = solutions[0]
    baselines = {}
    for name in hand.BASELINES:
        choice = hand.choose(name, graph)
        if choice is None:
            continue
        ev = evaluate(graph, costs, choice, storage=hand.storage_levels(name, graph, choice))
        if not math.isfinite(ev.total_s):
            continue  # a block of it cannot run (out of memory when profiled): there is no prediction to record
        baselines[name] = {
            "predicted_step_time_s": ev.total_s,
            "memory_per_device_bytes": ev.memory.total,
            "fits": limit is None or ev.memory.total <= limit,
            "configs": [graph.block_configs(b)[c].config.name for b, c in zip(graph.blocks, choice)],
        }
    prov = {"cluster": getattr(cluster, "name", None), "analysis_seconds": round(graph.seconds, 2)}
    if cost == "analytic":
        prov["backend"] = "analytic"
    if validate:
        checked = validate_plans(
            spec,
            graph,
            costs,
            solutions,
            limit,
            lambda s: build_plan(graph, costs, s, baselines, prov),
            validate_steps or DEFAULT_STEPS,
            on_step=on_validate_step,
        )
        solution, plan = checked.chosen.solution, checked.chosen.plan
        plan.validation = checked.to_json()
    else:
        plan = build_plan(graph, costs, solution, baselines, prov)
    if output is not None and launched_rank() == 0:
        plan.save(output)
    return plan, graph, solution


def plan(model, mesh, **kwargs) -> Plan:
    """``cfp.plan("gpt:small", "2x2", memory="40GiB", cost="analytic")``: the Plan (see make_plan for the options)."""
    return make_plan(model, mesh, **kwargs)[0]
