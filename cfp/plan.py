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
from cfp.placements import Placements, from_str, is_sharded, normalize, replicated, to_str, to_strs
from cfp.storage import StorageTable
from cfp.version import __version__

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
                f"{source} has plan schema version {version!r}; this CFP ({__version__}) reads "
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
# Writing a plan from a solution (cfp.pipeline.make_plan runs the whole job)
# --------------------------------------------------------------------------


def parameter_placements(graph, choice: list[int]) -> dict[str, Placements]:
    """Every parameter FQN -> placements, from the chosen configs' entry placements (aliases included)."""
    traced = graph.traced
    out: dict[str, list[str]] = {}
    for block, c in zip(graph.blocks, choice):
        strategy = graph.block_strategies(block)[c]
        for pos, inp in enumerate(block.inputs):
            fqn = traced.params.get(inp.name)
            if fqn is None or fqn in out:
                continue
            pl = strategy.input_placements[pos]
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


def block_entry(graph, block, strategy) -> dict[str, Any]:
    """What the plan file records of one block under its chosen config."""
    return {
        "id": block.id,
        "anchor": block.anchor,
        "op": str(graph.traced.nodes[block.anchor].target).replace(".default", ""),
        "class": graph.class_of(block),
        "config": strategy.config.name,
        "params": list(block.params),
        "inputs": [
            {"name": i.name, "role": i.role, "producer": i.producer, "placements": normalize(p)}
            for i, p in zip(block.inputs, strategy.input_placements)
        ],
    }


def build_plan(
    graph, costs, solution, baselines: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None
) -> Plan:
    """A Plan from a BlockGraph, the cost model used and the ILP's Solution."""
    traced = graph.traced
    ev = solution.evaluation
    levels = solution.storage or ["replicate"] * len(graph.blocks)
    recompute = solution.recompute or [False] * len(graph.blocks)
    blocks = []
    compute_total = comm_total = 0.0
    split = hasattr(costs, "block_cost")
    for block, c in zip(graph.blocks, solution.choice):
        strategy = graph.block_strategies(block)[c]
        entry = {
            **block_entry(graph, block, strategy),
            "time_s": ev.block_s[block.id],
            "transition_in_s": ev.transition_in_s[block.id],
            "activation_bytes": int(strategy.activation_bytes),
            "communication_free": strategy.comm_free,
            "storage": levels[block.id],
            "recompute": bool(recompute[block.id]),
        }
        if split:
            bc = costs.block_cost(graph.class_of(block), strategy.config.name)
            entry["compute_s"], entry["communication_s"] = bc.compute_s, bc.communication_s
            compute_total += bc.compute_s
            comm_total += bc.communication_s
        blocks.append(entry)
    breakdown = {"blocks": ev.blocks_total_s, "transitions": ev.transitions_total_s}
    if split:
        breakdown.update({"compute": compute_total, "communication": comm_total})
    memory = ev.memory.to_json()
    memory["limit"] = solution.memory_limit
    prov = {"cost_model": costs.name, "torch": torch.__version__, "cfp": __version__}
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
