"""Applying a plan: the model's exported training graph run on DTensors.

``parallelize(model, plan, mesh)`` captures the model (the same
``torch.export`` graph the plan was made for; a plan for another model is
refused by fingerprint), holds its parameters as DTensor ``nn.Parameter``s
with the plan's placements, and returns a module whose ``forward(*inputs)``
interprets the exported graph in order:

- the prologue (ops no parameter reaches: positions, masks, rotary tables)
  runs on plain tensors, whole on every rank;
- before a block's ops read a value from outside the block (the anchor's
  activation, a parameter, a residual stream, a buffer, a graph input), that
  value is redistributed to the placements the plan's config gives it, once
  per block, and its gradient is brought back to those placements on the way
  out of the block's backward, as profiling times it;
- the block's ops then run with DTensor's own sharding propagation through
  ``cfp.program.DTensorExecutor``, the very executor analysis propagates and
  profiling times with (export's asserts skipped, a ``Partial`` operand of a sum with a
  non-``Partial`` one reduced first, ops DTensor has no rule for run
  replicated);
- buffers a block updated in place (BatchNorm's running statistics) are
  written back to the module's buffers;
- the loss comes back as a plain tensor (``full_tensor``), so
  ``loss.backward()`` works, and each parameter's gradient is brought to the
  parameter's own placements as it is accumulated (a replicated weight used
  on batch-sharded data gets a ``Partial`` gradient: that reduction is data
  parallelism's all-reduce), so any ``torch.optim`` optimizer steps it.

Every rank passes the same global inputs; plain tensors are distributed per
the plan without communication (each rank keeps its own shard), and DTensor
inputs are redistributed.

The plan's ``storage`` and per-block ``recompute`` are applied too
(``cfp.storage`` says what they mean):

- a parameter stored ZeRO-sharded is an ``nn.Parameter`` DTensor with its
  *storage* placements, so the optimizer steps shards and keeps sharded
  moments; a block reading it gathers it to its compute placements
  (``cfp.sharded.gather``), and the gradient comes back to the shard by
  reduce-scatter (ZeRO-2/3) or all-reduce and slice (ZeRO-1);
- a ZeRO-3 parameter's gathered copy is not kept for backward:
  ``cfp.sharded.Regather`` saves a token instead and gathers it again there;
- a recomputed block's ops run under ``torch.utils.checkpoint`` (one region
  per contiguous run of its ops), its gathers included (lowered, the
  partitioner does both of these, one recompute region per block: see
  ``cfp.lower``);
- values are freed after their last use, as ``torch.fx.Interpreter`` does,
  so what stays alive is what autograd saves.

That is ``ParallelModule.interpret``, the definition of a step. By default
it runs lowered: ``cfp.lower`` traces it once with AOTAutograd into a
forward and a backward program of local ops and functional collectives,
and each step runs those (see there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from cfp.allocator import keep_freed_host_memory
from cfp.blocks import partition
from cfp.capture import TracedModel, capture
from cfp.collectives import use_gloo_all_to_all
from cfp.errors import CFPError
from cfp.lower import LoweredForward, recompute_region, stored_gather
from cfp.materialize import InitFn, materialize, on_meta
from cfp.placements import Placements, replicate_partials
from cfp.plan import Plan, block_entry, parameter_placements, spec_json
from cfp.program import DTensorExecutor, GradPlacedLikeValue, may_update_arguments
from cfp.sharded import Regather, Schedule, gather, schedule
from cfp.spec import ModelSpec, Workload, build
from cfp.storage import LEVELS

# --------------------------------------------------------------------------
# Plans in memory
# --------------------------------------------------------------------------


def config_indices(graph, choice: Mapping[int, str] | Sequence[str] | Callable[[Any, list[str]], str]) -> list[int]:
    """Config index per block from config names.

    ``choice`` is ``{block id: config name}`` (blocks left out take their
    first config), a list of names aligned with the blocks, or a function
    ``(block, available names) -> name``.
    """
    indices = []
    for block in graph.blocks:
        names = [p.config.name for p in graph.block_strategies(block)]
        if callable(choice):
            name = choice(block, names)
        elif isinstance(choice, Mapping):
            name = choice.get(block.id, names[0])
        else:
            name = choice[block.id]
        if name not in names:
            raise CFPError(f"Block {block.id} ({block.anchor}) has no config {name!r}; it has {', '.join(names)}.")
        indices.append(names.index(name))
    return indices


def plan_from_choice(graph, choice: Mapping[int, str] | Sequence[str] | Callable[[Any, list[str]], str]) -> Plan:
    """A Plan choosing one config per block by name (see ``config_indices``), without costs."""
    return plan_from_indices(graph, config_indices(graph, choice))


def plan_from_indices(
    graph, indices: Sequence[int], storage: Sequence[str] | None = None, recompute: Sequence[bool] | None = None
) -> Plan:
    """A Plan from one config index per block (e.g. ``cfp.baselines.dp(graph)``), with a storage level
    per block (``cfp.storage.LEVELS``; a block with nothing to shard stays ``replicate``) and whether it recomputes."""
    from cfp.storage import StorageTable

    traced = graph.traced
    table = StorageTable(graph)
    storage = [
        lv if lv in table.levels(b.id, c) else "replicate"
        for b, c, lv in zip(graph.blocks, indices, storage or ["replicate"] * len(graph.blocks))
    ]
    recompute = list(recompute or [False] * len(graph.blocks))
    blocks = [
        {**block_entry(graph, block, graph.block_strategies(block)[c]), "storage": lv, "recompute": bool(r)}
        for block, c, lv, r in zip(graph.blocks, indices, storage, recompute)
    ]
    return Plan(
        model={
            "spec": spec_json(traced.spec),
            "fingerprint": traced.fingerprint(),
            "parameters": traced.num_parameters(),
        },
        mesh=graph.mesh.to_json(),
        parameters=parameter_placements(graph, list(indices)),
        storage=table.parameter_storage(list(indices), storage),
        blocks=blocks,
        predicted_step_time_s=0.0,
        time_breakdown_s={},
        memory_per_device_bytes={},
        solve={"status": "chosen by hand"},
        provenance={"cost_model": "none", "torch": torch.__version__},
    )


def spec_of(plan: Plan, device: str = "cpu") -> ModelSpec:
    """The ModelSpec a plan was made for, to build on ``device``."""
    s = plan.model.get("spec") or {}
    if not s.get("spec"):
        raise CFPError("The plan does not record its model spec; pass the model and example_inputs yourself.")
    return ModelSpec(s["spec"], batch=s.get("batch"), seq=s.get("seq"), device=device, args=dict(s.get("args") or {}))


# --------------------------------------------------------------------------
# The parallel module
# --------------------------------------------------------------------------


def _set_path(root: nn.Module, fqn: str, value, kind: str) -> None:
    """Register ``value`` at ``fqn`` under ``root``, creating empty parent modules."""
    *path, name = fqn.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if kind == "param":
        module.register_parameter(name, value)
    else:
        module.register_buffer(name, value, persistent=False)


def _target(placements: Placements) -> Placements:
    # Analysis makes every external input with make_dtensor, which turns a Partial into a Replicate.
    return replicate_partials(placements)


@dataclass
class BoundPlan:
    """A plan matched to the model's exported graph: where each parameter lives and what each block reads.

    It holds no tensors: ``ParallelModule`` makes its parameters from it, and
    runs each op in its block with the block's entry placements.
    """

    placements: dict[str, Placements]  # parameter placeholder -> placements it is held with (stored ones: storage)
    stored: dict[str, tuple[str, Placements]]  # placeholder of a ZeRO-stored parameter -> (level, compute placements)
    owner: dict[str, int]  # op name -> id of the block that runs it (prologue ops have none)
    entry: list[dict[str, Placements | None]]  # per block: its external inputs -> the placements it reads them with
    configs: list[str]  # per block: its config's name
    recompute: set[int]  # blocks whose activations are recomputed in backward


def bind(plan: Plan, traced: TracedModel, mesh: DeviceMesh) -> BoundPlan:
    """Match ``plan`` to the model's graph, refusing a plan that does not fit it.

    Each parameter gets the plan's placements (its storage placements when
    the plan stores it ZeRO-sharded, the compute ones kept beside); the graph
    is cut into blocks again and matched to the plan's by anchor, and each
    block gets its inputs' entry placements.
    """
    ndim = mesh.ndim
    placements: dict[str, Placements] = {}
    stored: dict[str, tuple[str, Placements]] = {}
    for name, fqn in traced.params.items():
        compute = plan.parameters.get(fqn)
        if compute is None:
            raise CFPError(f"The plan gives no placements for parameter {fqn}.")
        compute = _target(compute)
        if len(compute) != ndim:
            raise CFPError(f"The plan gives {len(compute)} placements for {fqn} on a {ndim}-D mesh.")
        placements[name] = compute
        storage = plan.storage.get(fqn)
        if storage is not None:
            if storage.get("level") not in LEVELS[1:] or len(storage.get("placements") or ()) != ndim:
                raise CFPError(
                    f"The plan's storage of {fqn} ({storage}) is not a ZeRO level "
                    f"with one placement per mesh dimension; re-run `cfp plan`."
                )
            stored[name] = (storage["level"], compute)
            placements[name] = storage["placements"]

    blocks = partition(traced)
    if len(blocks) != len(plan.blocks):
        raise CFPError(
            f"The plan has {len(plan.blocks)} blocks but the model cuts into {len(blocks)}; "
            "re-run `cfp plan` for this model."
        )
    owner: dict[str, int] = {}
    entry: list[dict[str, Placements | None]] = []
    for block, planned in zip(blocks, plan.blocks):
        if planned.get("anchor") != block.anchor:
            raise CFPError(
                f"Plan block {planned.get('id')} is anchored at {planned.get('anchor')}, "
                f"the model's at {block.anchor}; re-run `cfp plan`."
            )
        for n in block.nodes:
            owner[n] = block.id
        entry.append({i["name"]: i.get("placements") for i in planned["inputs"]})
    return BoundPlan(
        placements=placements,
        stored=stored,
        owner=owner,
        entry=entry,
        configs=[planned["config"] for planned in plan.blocks],
        recompute={planned["id"] for planned in plan.blocks if planned.get("recompute")},
    )


class ParallelModule(nn.Module):
    """The model's exported training step on DTensors, per a CFP plan (made by ``parallelize``)."""

    def __init__(
        self,
        traced: TracedModel,
        plan: Plan,
        mesh: DeviceMesh,
        model: nn.Module,
        lowered: bool = True,
        compile: bool = False,
    ):
        super().__init__()
        self.mesh = mesh
        self.plan = plan
        self._graph = traced.exported.graph_module.graph
        self._user_inputs = list(traced.user_inputs)
        self._fallbacks: list[str] = []
        device = (
            torch.device(mesh.device_type, torch.cuda.current_device())
            if mesh.device_type == "cuda"
            else torch.device(mesh.device_type)
        )

        # The plan read against the graph: each parameter's placements, each op's block, each block's entry.
        bound = bind(plan, traced, mesh)
        self._stored = bound.stored
        self._owner = bound.owner
        self._entry = bound.entry
        self.configs = bound.configs
        self._recompute = bound.recompute

        # Parameters: DTensors with the plan's placements, same FQNs, tied ones shared.
        model_params = dict(model.named_parameters(remove_duplicate=False))
        self._param_of: dict[str, nn.Parameter] = {}  # placeholder -> parameter
        by_fqn: dict[str, nn.Parameter] = {}
        for name, fqn in traced.params.items():
            tensor = model_params[fqn].detach().to(device)
            param = nn.Parameter(
                distribute_tensor(tensor, mesh, bound.placements[name]), requires_grad=model_params[fqn].requires_grad
            )
            by_fqn[fqn] = param
            self._param_of[name] = param
            _set_path(self, fqn, param, "param")
        for alias, canonical in traced.aliases.items():
            if canonical in by_fqn:
                _set_path(self, alias, by_fqn[canonical], "param")
        # Parameters the graph never reads (e.g. an unused tied alias's placeholder) need no placeholder value.

        # Buffers and lifted constants stay plain tensors, distributed where a block reads them.
        model_buffers = dict(model.named_buffers(remove_duplicate=False))
        constants = getattr(traced.exported, "constants", {}) or {}
        self._buffer_of: dict[str, str] = {}
        self._buffer_fqn = dict(traced.buffers)
        for name, fqn in traced.buffers.items():
            value = model_buffers.get(fqn)
            if value is None:
                value = constants.get(fqn)
            if value is None:
                value = traced.exported.state_dict.get(fqn)
            if not isinstance(value, torch.Tensor):
                raise CFPError(f"Buffer or constant {fqn} of the exported graph was not found in the model.")
            attr = "_cfp_buffer_" + name
            self.register_buffer(attr, value.detach().to(device), persistent=False)
            self._buffer_of[name] = attr

        self._schedule: Schedule = schedule(self._graph, self._owner, self._recompute)
        self._regather = Regather(mesh)

        # Gradients take the parameter's own placements as they accumulate (data parallelism's reduction).
        for param in by_fqn.values():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._reduce_grad)

        if compile and not lowered:
            raise CFPError("compile=True compiles the lowered programs; it needs lowered=True.")
        self._lowered = LoweredForward(self, compile) if lowered else None

    @property
    def lowered(self) -> bool:
        """Whether each step runs as lowered local programs (else on the DTensor interpreter)."""
        return self._lowered is not None

    def _reduce_grad(self, param: nn.Parameter) -> None:
        grad = param.grad
        if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(param.placements):
            param.grad = grad.redistribute(self.mesh, param.placements)

    def model_buffers(self) -> dict[str, torch.Tensor]:
        """The model's buffers and constants by FQN, as this module holds (and updates) them."""
        return {self._buffer_fqn[name]: getattr(self, attr) for name, attr in self._buffer_of.items()}

    @property
    def fallbacks(self) -> list[str]:
        """Ops of the last forward that DTensor had no rule for and that ran replicated."""
        return list(self._fallbacks)

    def _enter(self, value, placements: Placements | None, name: str, block: int, recomputed: bool = False):
        """``value`` with the placements a block's config gives it (a stored parameter gathered)."""
        if placements is None or not isinstance(value, torch.Tensor):
            return value
        placements = _target(placements)
        if name in self._stored:
            level, compute = self._stored[name]
            with stored_gather(block, level):  # what a lowered step's passes read (cfp.lower)
                gathered = gather(value, self.mesh, compute, level)
            if level == "zero3" and not recomputed:  # a recomputed block's checkpoint drops it anyway
                self._regather.register(gathered, value, compute)
            return gathered
        if isinstance(value, DTensor):
            # A parameter's gradient is brought to its placements once, where all its uses have summed it.
            if tuple(value.placements) != placements:
                value = value.redistribute(self.mesh, placements)
            is_param = name in self._param_of
            return GradPlacedLikeValue.apply(value) if value.requires_grad and not is_param else value
        # A plain tensor is the same on every rank: each keeps its shard, no communication.
        return distribute_tensor(value, self.mesh, placements, src_data_rank=None)

    @torch.no_grad()
    def _write_back_buffers(self, versions: dict) -> None:
        """Buffers a block updated in place (BatchNorm's running statistics) were updated on the
        copy placed for that block: bring the new values back to the module's buffer. Updated means
        its version counter moved, or an op that may update its arguments read it: batch norm's
        update of the statistics moves no version counter."""
        for (_block, name), (value, version, read_by_update) in versions.items():
            buffer = getattr(self, self._buffer_of[name])
            if value is not buffer and (read_by_update or value._local_tensor._version != version):
                buffer.copy_(value.full_tensor())

    def forward(self, *inputs):
        if len(inputs) != len(self._user_inputs):
            raise TypeError(
                f"expected {len(self._user_inputs)} inputs ({', '.join(self._user_inputs)}), got {len(inputs)}"
            )
        if self._lowered is not None:
            return self._lowered(*inputs)
        values = {name: param for name, param in self._param_of.items()}
        values.update({name: getattr(self, attr) for name, attr in self._buffer_of.items()})
        values.update(zip(self._user_inputs, inputs))
        return self.interpret(values)

    def interpret(self, values: Mapping[str, Any], lowering: bool = False):
        """Run the exported graph on DTensors, from ``values`` of its placeholders (parameters,
        buffers, user inputs; a placeholder left out is one the graph does not read).

        ``lowering``: AOTAutograd is tracing this run. A recomputed block's ops are then traced once,
        in a ``recompute_region`` the partitioner recomputes, and ZeRO-3 gathers are left to it too
        (``cfp.lower``), in place of checkpoint and ``Regather``'s hooks."""
        env: dict[str, Any] = {}
        entered: dict[tuple[int, str], Any] = {}  # (block, value) -> the value as that block reads it
        buffer_versions: dict[tuple[int, str], tuple] = {}  # (block, buffer) -> (its copy, version counter on entry)
        executor = DTensorExecutor(self.mesh)
        for node in self._schedule.placeholders:
            env[node.name] = values.get(node.name)
        # Traced, a parameter's gradient reaches its placements through GradPlacedLikeValue, applied before the
        # parameter's first use: autograd runs it as soon as the gradient is complete, so the reduction is issued
        # in backward order (applied before the step, it ran last: every all-reduce waited for the whole backward).
        # Every rank must trace the same order (it is the order of the reductions): graph order, no set's.
        unplaced = {name for name, p in self._param_of.items() if lowering and p.requires_grad}
        # A block's ops can come in several regions (other ops between them); they share the region id of its
        # first, else the partitioner saves every value one of them hands the next, as between two checkpoints.
        region_of: dict[int, int] = {}
        with contextlib.nullcontext() if lowering else self._regather.hooks():
            for index, step in enumerate(self._schedule.steps):
                for arg in (a for node in step.nodes for a in node.all_input_nodes) if unplaced else ():
                    if arg.name in unplaced:
                        env[arg.name] = GradPlacedLikeValue.apply(env[arg.name])
                        unplaced.discard(arg.name)
                if step.recompute and lowering:
                    with recompute_region(region_of.setdefault(step.block, index)):
                        outs = self._run_region(step, [env[n] for n in step.inputs], executor, buffer_versions)
                    env.update(zip(step.outputs, outs))
                elif step.recompute:
                    # Only the first run (forward) writes updated buffers back, not the recomputation in backward.
                    once = [buffer_versions]

                    def fn(*values, step=step, once=once):
                        return self._run_region(step, values, executor, once.pop() if once else None)

                    outs = torch.utils.checkpoint.checkpoint(fn, *(env[n] for n in step.inputs), use_reentrant=False)
                    env.update(zip(step.outputs, outs))
                else:
                    for node in step.nodes:
                        env[node.name] = self._run_node(node, env, entered, executor, versions=buffer_versions)
                for name in step.free:
                    env.pop(name, None)
                for key in [k for k in entered if k[0] in step.blocks_done]:
                    del entered[key]
        self._regather.clear()
        self._fallbacks = executor.fallbacks
        self._write_back_buffers(buffer_versions)
        loss = torch.fx.node.map_arg(self._schedule.output, lambda n: env[n.name])
        loss = loss[0] if isinstance(loss, (tuple, list)) and len(loss) == 1 else loss
        return loss.full_tensor() if isinstance(loss, DTensor) else loss

    def _run_node(
        self, node, env: dict, entered: dict, executor: DTensorExecutor, recomputed: bool = False, versions=None
    ):
        """One op: values from outside its block enter with the block's placements, then the executor runs it.
        ``versions`` collects the buffers blocks read, to write in-place updates back."""
        block = self._owner.get(node.name)
        may_update = may_update_arguments(node.target)

        def read(arg):
            if block is None:  # the prologue: plain tensors, whole on every rank
                value = env[arg.name]
                return value.full_tensor() if isinstance(value, DTensor) else value
            if self._owner.get(arg.name) == block:
                return env[arg.name]
            key = (block, arg.name)
            if key not in entered:
                entered[key] = self._enter(env[arg.name], self._entry[block].get(arg.name), arg.name, block, recomputed)
                if versions is not None and arg.name in self._buffer_of and isinstance(entered[key], DTensor):
                    versions[key] = (entered[key], entered[key]._local_tensor._version, False)
            if versions is not None and key in versions and may_update:
                versions[key] = (*versions[key][:2], True)
            return entered[key]

        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), read)
        return executor.run_node(node, args, kwargs)

    def _run_region(self, step, values, executor: DTensorExecutor, versions=None) -> tuple:
        """A recomputed block's contiguous ops (forward, and again in backward under checkpoint)."""
        env = dict(zip(step.inputs, values))
        entered: dict = {}
        for node in step.nodes:
            env[node.name] = self._run_node(node, env, entered, executor, recomputed=True, versions=versions)
        return tuple(env[n] for n in step.outputs)


def _held_placements(plan: Plan) -> dict[str, Placements]:
    """Each parameter's placements as the parallel module holds it: its storage placements where it is
    ZeRO-stored, else the ones it computes with."""
    held = {fqn: _target(placements) for fqn, placements in plan.parameters.items()}
    for fqn, stored in plan.storage.items():
        if fqn in held and stored.get("placements"):
            held[fqn] = stored["placements"]
    return held


def _mesh_for(plan: Plan, mesh, device_type: str) -> DeviceMesh:
    from cfp.mesh import MeshSpec, device_mesh

    shape = tuple(plan.mesh["shape"])
    if mesh is None:
        return device_mesh(MeshSpec(shape, tuple(plan.mesh["names"])), device_type)
    if isinstance(mesh, DeviceMesh):
        if tuple(mesh.shape) != shape:
            raise CFPError(
                f"The plan is for a mesh of shape {shape}, the device mesh given has shape {tuple(mesh.shape)}."
            )
        return mesh
    raise CFPError(f"mesh must be a DeviceMesh or None, not {type(mesh).__name__}.")


def parallelize(
    model: nn.Module,
    plan: Plan | str | Path,
    mesh: DeviceMesh | None = None,
    example_inputs: tuple | None = None,
    traced: TracedModel | None = None,
    lowered: bool = True,
    compile: bool | None = None,
    init_fn: InitFn | Sequence[InitFn] | None = None,
    seed: int | None = None,
) -> ParallelModule:
    """The model as a module whose forward runs the plan with DTensor (see the module docstring).

    A model built on ``meta`` (``with torch.device("meta"): Model()``) is
    materialised here, one module at a time, each rank keeping only its
    shards and never the whole model: its ``reset_parameters`` then each
    ``init_fn`` pass, from ``seed`` (``cfp.materialize`` says the contract
    under which this equals ``torch.manual_seed(seed); Model()`` on one
    device). A model with real tensors is sharded as it is; ``init_fn`` and
    ``seed`` apply to meta models only.

    ``plan`` is a Plan or a plan file; ``mesh`` a DeviceMesh of the plan's
    shape over the initialised process group (default: one made from the
    plan's mesh on the model's device type). ``example_inputs`` are the
    inputs to capture with; by default the plan's model spec is built on
    ``meta`` for them (same shapes). A plan made for another model (graph
    structure, shapes or parameter names differ) is refused.

    ``lowered`` (default) runs each step as the local programs AOTAutograd
    traces from the DTensor interpreter (``cfp.lower``); ``lowered=False``
    runs the interpreter itself, for debugging and comparison. ``compile``
    compiles the lowered programs with inductor; by default a plan made with
    ``cfp plan --compile`` (profiled compiled) is compiled, others are not. On gloo, a sharded dim
    moves to another dim by all-to-all (``cfp.collectives``); on CPU,
    freed host memory is kept for the next step (``cfp.allocator``).
    """
    use_gloo_all_to_all()
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if compile is None:  # train as the plan was profiled
        compile = lowered and plan.provenance.get("runtime") == "compiled"
    first = next(iter(model.parameters()), None)
    device_type = first.device.type if first is not None and first.device.type != "meta" else "cpu"
    meta = on_meta(model)
    if not meta and (init_fn is not None or seed is not None):
        raise CFPError("init_fn and seed initialise a model built on meta; this model has its weights already.")
    if meta:
        device_type = (
            mesh.device_type if isinstance(mesh, DeviceMesh) else "cuda" if torch.cuda.is_available() else "cpu"
        )
        if example_inputs is not None:  # captured on meta, like the model
            example_inputs = tuple(
                t.to("meta") if isinstance(t, torch.Tensor) else t
                for t in (example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
            )
    if traced is None:
        spec = None
        if example_inputs is None:
            spec = spec_of(plan, device="meta")
            meta_inputs = build(spec).inputs
            device = first.device if first is not None else torch.device("cpu")
            example_inputs = tuple(
                torch.zeros(t.shape, dtype=t.dtype, device=device) if isinstance(t, torch.Tensor) else t
                for t in meta_inputs
            )
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        example_inputs = tuple(t.full_tensor() if isinstance(t, DTensor) else t for t in example_inputs)
        traced = capture(Workload(spec=spec or ModelSpec("<model>"), model=model, inputs=example_inputs))
    plan.check_matches(traced)
    mesh = _mesh_for(plan, mesh, device_type)
    if mesh.device_type == "cpu":  # as profiling ran
        keep_freed_host_memory()
    if meta:
        materialize(model, _held_placements(plan), mesh, init_fn=init_fn, seed=seed)
    return ParallelModule(traced, plan, mesh, model, lowered=lowered, compile=compile)
