"""Where parameter state is stored, apart from where it computes; and recomputing activations.

A block's config fixes where each parameter *computes* (its entry
placements). Along a mesh dimension on which a parameter computes
``Replicate`` (a data-parallel dimension), its state can instead be *stored*
sharded, ZeRO-style (Rajbhandari et al. 2020), at one of four levels:

- ``replicate``: parameter, gradient and Adam moments on every rank (no ZeRO);
- ``zero1``: the optimizer steps a shard: the gradient is all-reduced as in
  data parallelism, each rank keeps its slice of it, and the parameter is
  all-gathered from the updated shards before use;
- ``zero2``: as ``zero1`` but the gradient is reduce-scattered, so only its
  shard is ever reduced;
- ``zero3`` (FSDP): as ``zero2``, and the gathered parameter is not kept for
  backward: backward gathers it again.

In every sharded level the ``nn.Parameter`` the optimizer sees is a DTensor
with the *storage* placements (``Shard(d)`` on those mesh dimensions), so
``torch.optim`` steps shards and keeps sharded moments. At block entry it is
redistributed to the compute placements; DTensor's autograd turns the
backward of that all-gather into the reduce-scatter (``Partial -> Shard``).
``cfp.parallelize`` applies it; this module says which placements, what it
costs and how much memory it takes. The lowered step gathers a block's
stored parameters in one flat all-gather and reduce-scatters their gradients
in one flat reduce-scatter, as FSDP2 does a module's; so each is priced as
one transition of a flat tensor that size (``gather_keys``, ``scatter_keys``),
profiled or analytic.

*Recomputation* is a second per-block choice: the block runs under
``torch.utils.checkpoint``, its saved activations are dropped (its exits
stay, they are the next blocks' inputs) and backward runs its forward once
more, at its profiled (or analytic) forward time.

Parameters read by several blocks (tied weights) are always stored where
they compute: the blocks reading them could otherwise disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from cfp.costs import TransitionKey, shared_parameters
from cfp.placements import Placements, is_sharded, local_numel, normalize, replicated

LEVELS = ("replicate", "zero1", "zero2", "zero3")
SHARDED = LEVELS[1:]
ADAM_STATE_BYTES_PER_PARAM = 8  # two fp32 moments


def storage_placements(shape: tuple[int, ...], compute: Placements, mesh_shape: tuple[int, ...]) -> Placements | None:
    """``compute`` with each ``Replicate()`` mesh dim (of size > 1) sharding one tensor dim; None if none can.

    The tensor dim is the largest one no other mesh dim shards that the
    product of those mesh dims divides (so every shard is the same size and
    the optimizer steps equal slices); every such mesh dim shards that same
    tensor dim, as FSDP flattens a data-parallel mesh.
    """
    dp = [i for i, (p, n) in enumerate(zip(compute, mesh_shape)) if p.is_replicate() and n > 1]
    if not dp:
        return None
    ways = math.prod(mesh_shape[i] for i in dp)
    taken = {p.dim for p in compute if is_sharded(p)}
    local = list(shape)
    for p, n in zip(compute, mesh_shape):
        if is_sharded(p):
            local[p.dim] //= n
    dims = [d for d in range(len(shape)) if d not in taken and local[d] % ways == 0]
    if not dims:
        return None
    dim = max(dims, key=lambda d: (local[d], -d))
    return tuple(Shard(dim) if i in dp else p for i, p in enumerate(compute))


def _buckets(params: list[ParamStorage], mesh_shape) -> dict[tuple[str, tuple[int, ...]], int]:
    """A block's stored parameters as the lowered step gathers them (``lower.bucket_collectives``): one flat
    bucket per dtype and set of mesh dims gathered over, of that many elements (this rank's, gathered)."""
    out: dict[tuple[str, tuple[int, ...]], int] = {}
    for p in params:
        dims = tuple(i for i, (s, c) in enumerate(zip(p.storage, p.compute)) if s != c)
        out[(p.dtype, dims)] = out.get((p.dtype, dims), 0) + local_numel(p.shape, p.compute, mesh_shape)
    return out


def _on(dims: tuple[int, ...], ndim: int, placement) -> Placements:
    """``placement`` on mesh ``dims``, ``Replicate()`` on the others."""
    return tuple(placement if i in dims else Replicate() for i in range(ndim))


def gather_keys(params: list[ParamStorage], mesh_shape) -> list[TransitionKey]:
    """The all-gathers of a block's stored parameters, one per bucket (their forwards are what gathering costs)."""
    ndim = len(mesh_shape)
    return [
        TransitionKey((numel,), dtype, _on(dims, ndim, Shard(0)), replicated(ndim))
        for (dtype, dims), numel in _buckets(params, mesh_shape).items()
    ]


def scatter_keys(params: list[ParamStorage], mesh_shape) -> list[TransitionKey]:
    """The reduce-scatters of a block's gradients to its stored parameters' shards, one per bucket."""
    ndim = len(mesh_shape)
    return [
        TransitionKey((numel,), dtype, _on(dims, ndim, Partial("sum")), _on(dims, ndim, Shard(0)))
        for (dtype, dims), numel in _buckets(params, mesh_shape).items()
    ]


@dataclass
class ParamStorage:
    """One parameter of a block under one config: its shape, compute and storage placements."""

    pos: int  # input position in the block
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    compute: Placements
    storage: Placements
    ways: int  # how many shards the storage dims make

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Variant:
    """What one storage level (or recomputation) adds to a (block, config): seconds and bytes."""

    time_s: float = 0.0
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    transient: int = 0  # bytes alive only while this block runs (a gathered parameter, recomputed activations)
    reduced: int = 0  # gradient bytes it takes out of the lowered step's buckets


@dataclass
class BlockStorage:
    """Per block: the parameters it may store sharded, and per config the cost of each level and of recomputing."""

    params: list[list[ParamStorage]] = field(default_factory=list)  # per config index
    levels: list[dict[str, Variant]] = field(default_factory=list)  # per config index: level -> delta
    recompute: list[Variant | None] = field(default_factory=list)  # per config index


def _phase(costs, class_id: str, config: str, phase: str) -> float:
    """A block phase's seconds, from a cost model that splits them (profiled and analytic both do)."""
    fn = getattr(costs, "block_phase_s", None)
    return float(fn(class_id, config, phase)) if fn is not None else 0.0


def _scale(costs, feature: str) -> float:
    """What a validation-learnt correction (``cfp.correction``) multiplies this feature's deltas by; 1 if none."""
    fn = getattr(costs, "scale_of", None)
    return float(fn(feature)) if fn is not None else 1.0


def _forward_s(costs, key: TransitionKey) -> float:
    fn = getattr(costs, "transition_phase_s", None)
    return float(fn(key, "forward")) if fn is not None else costs.transition_time(key)


def _bytes(val, placements, mesh_shape) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    return local_numel(val.shape, placements, mesh_shape) * val.element_size()


class StorageTable:
    """Every block's storage and recomputation options under every config, priced and sized.

    Deltas are relative to the block as profiled (parameters replicated where
    they compute, activations saved): a sharded level adds the all-gather of
    each sharded parameter (twice for ``zero3``), replaces the gradient
    reduction by a reduce-scatter (``zero2``/``zero3``) and divides the AdamW
    step by the shard count; recomputing adds the block's forward.
    """

    def __init__(self, graph, costs=None, owner: dict[str, int] | None = None):
        self.graph = graph
        self.costs = costs
        traced, mesh_shape = graph.traced, tuple(graph.mesh.shape)
        shared = shared_parameters(graph)
        if owner is None:
            owner = {}
            for block in graph.blocks:
                for inp in block.inputs:
                    if inp.name in traced.params:
                        owner.setdefault(inp.name, block.id)
        self.blocks: list[BlockStorage] = []
        cache: dict[tuple, BlockStorage] = {}
        for block in graph.blocks:
            owned = tuple(
                pos
                for pos, inp in enumerate(block.inputs)
                if owner.get(inp.name) == block.id and inp.name not in shared
            )
            key = (graph.class_of(block), owned)
            if key not in cache:
                cache[key] = self._block(block, owned, mesh_shape)
            self.blocks.append(cache[key])

    def _block(self, block, owned, mesh_shape) -> BlockStorage:
        traced = self.graph.traced
        out = BlockStorage()
        for strategy in self.graph.block_strategies(block):
            params = []
            for pos in owned:
                val = traced.nodes[block.inputs[pos].name].meta["val"]
                compute = normalize(strategy.input_placements[pos]) or replicated(len(mesh_shape))
                storage = storage_placements(tuple(val.shape), compute, mesh_shape)
                if storage is None or not val.is_floating_point():
                    continue
                ways = math.prod(n for s, c, n in zip(storage, compute, mesh_shape) if s != c)
                dtype = str(val.dtype).removeprefix("torch.")
                params.append(ParamStorage(pos, tuple(val.shape), dtype, val.element_size(), compute, storage, ways))
            out.params.append(params)
            out.levels.append(self._levels(block, strategy, params, mesh_shape) if params else {})
            out.recompute.append(self._recompute(block, strategy, mesh_shape))
        return out

    def _levels(self, block, strategy, params: list[ParamStorage], mesh_shape) -> dict[str, Variant]:
        costs, name = self.costs, strategy.config.name
        full = [local_numel(p.shape, p.compute, mesh_shape) for p in params]  # elements where it computes
        shard = [local_numel(p.shape, p.storage, mesh_shape) for p in params]
        size = [p.itemsize for p in params]
        full_bytes = sum(n * s for n, s in zip(full, size))
        shard_bytes = sum(n * s for n, s in zip(shard, size))
        opt_saved = sum(f - s for f, s in zip(full, shard)) * ADAM_STATE_BYTES_PER_PARAM
        gather = scatter = reduce = optimizer = 0.0
        if costs is not None:
            gather = sum(_forward_s(costs, key) for key in gather_keys(params, mesh_shape))
            scatter = sum(_forward_s(costs, key) for key in scatter_keys(params, mesh_shape))
            # The profiled reduction and AdamW step cover every parameter of the block; these are their share.
            total = sum(_bytes(traced_val, pl, mesh_shape) for traced_val, pl in self._param_values(block, strategy))
            frac = full_bytes / total if total else 0.0
            reduce = _phase(costs, self.graph.class_of(block), name, "reduce") * frac
            opt_s = _phase(costs, self.graph.class_of(block), name, "optimizer") * frac
            optimizer = opt_s * (1 - sum(shard) / max(sum(full), 1))
        # zero1/zero2 keep the gathered parameter until backward and the shard besides it. The zero2/zero3
        # gradients are reduce-scattered a block at a time, not in the step's all-reduce buckets (cfp.lower).
        scale = {level: _scale(costs, f"storage:{level}") for level in SHARDED}
        return {
            "zero1": Variant((gather - optimizer) * scale["zero1"], params=shard_bytes, optimizer=-opt_saved),
            "zero2": Variant(
                (gather + scatter - reduce - optimizer) * scale["zero2"],
                params=shard_bytes,
                grads=shard_bytes - full_bytes,
                optimizer=-opt_saved,
                reduced=-strategy.comm_bytes("reduce"),
            ),
            "zero3": Variant(
                (2 * gather + scatter - reduce - optimizer) * scale["zero3"],
                params=shard_bytes - full_bytes,
                grads=shard_bytes - full_bytes,
                optimizer=-opt_saved,
                transient=full_bytes,
                reduced=-strategy.comm_bytes("reduce"),
            ),
        }

    def _param_values(self, block, strategy):
        traced = self.graph.traced
        for pos, inp in enumerate(block.inputs):
            if inp.name in traced.params:
                yield traced.nodes[inp.name].meta["val"], strategy.input_placements[pos]

    def _recompute(self, block, strategy, mesh_shape) -> Variant | None:
        """Checkpointing keeps the block's inputs instead of what its ops save; backward brings those back."""
        traced = self.graph.traced
        kept = sum(
            _bytes(traced.nodes[i.name].meta.get("val"), pl, mesh_shape)
            for i, pl in zip(block.inputs, strategy.input_placements)
            if i.name not in traced.params
        )
        dropped = int(strategy.saved_bytes) - kept
        if dropped <= 0:
            return None
        # Backward brings back what the block saves, less the kept inputs among it: they are still alive.
        saved_inputs = sum(
            _bytes(traced.nodes[i.name].meta.get("val"), pl, mesh_shape)
            for i, pl, is_saved in zip(block.inputs, strategy.input_placements, strategy.saved_inputs)
            if is_saved and i.name not in traced.params
        )
        forward = _phase(self.costs, self.graph.class_of(block), strategy.config.name, "forward")  # 0 without costs
        return Variant(
            forward * _scale(self.costs, "recompute"),
            activations=-dropped,
            transient=int(strategy.saved_bytes) - saved_inputs,
        )

    # -- what the ILP and the plan read ------------------------------------------
    def levels(self, block_id: int, config: int) -> dict[str, Variant]:
        return self.blocks[block_id].levels[config]

    def recompute(self, block_id: int, config: int) -> Variant | None:
        return self.blocks[block_id].recompute[config]

    def transition_keys(self) -> set[TransitionKey]:
        """The all-gathers and reduce-scatters a sharded level can need: what profiling must time."""
        keys = set()
        mesh_shape = tuple(self.graph.mesh.shape)
        for bs in {id(b): b for b in self.blocks}.values():
            for params in bs.params:
                keys.update(gather_keys(params, mesh_shape), scatter_keys(params, mesh_shape))
        return keys

    def parameter_storage(self, choice: list[int], storage: list[str]) -> dict[str, dict]:
        """FQN -> {"level", "placements"} of every parameter a plan stores sharded (aliases included), as
        ``Plan.storage`` holds it."""
        traced = self.graph.traced
        out: dict[str, dict] = {}
        for block, c, level in zip(self.graph.blocks, choice, storage):
            if level == "replicate":
                continue
            for p in self.blocks[block.id].params[c]:
                out[traced.params[block.inputs[p.pos].name]] = {"level": level, "placements": p.storage}
        for alias, canonical in traced.aliases.items():
            if canonical in out:
                out[alias] = dict(out[canonical])
        return out


def uniform(graph, table: StorageTable, choice: list[int], level: str) -> list[str]:
    """``level`` on every block that has parameters to shard under its config, else ``replicate``."""
    return [level if level in table.levels(b.id, c) else "replicate" for b, c in zip(graph.blocks, choice)]
