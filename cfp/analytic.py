"""Analytic costs: the Alpa-style baseline cost model.

Prices a block from FLOP counts and bytes under the config's local shapes
(a roofline per op on the cluster's device) plus the collectives that
propagation recorded, each priced by the cluster's alpha-beta model. Prices a
transition from the collectives DTensor's ``redistribute`` issues between
the two placements, forward and backward. Nothing is measured, which is
exactly what profiling is compared against.

- compute: every op of the block runs forward once and backward twice
  (``3x`` its forward FLOPs and ``3x`` its memory traffic); an op's local
  FLOPs are its global FLOPs divided by the mesh dimensions on which its
  output is ``Shard`` or ``Partial`` (a partial sum is a split contraction);
  its bytes are its local output, read and written once, plus the local
  parameters an anchor reads. Views move no data.
- communication: the config's forward, backward and gradient-reduction
  collectives, summed (no overlap with compute is assumed); a block's
  gradient reductions are bucketed into one collective per kind and mesh
  dimension, as DDP does.
"""

from __future__ import annotations

import math
import operator

import torch

from cfp.anchors import is_view
from cfp.cluster import ClusterModel
from cfp.costs import BlockCost, CostSetup, TransitionKey, register_cost_model
from cfp.errors import CFPError
from cfp.mesh import MeshSpec
from cfp.placements import is_sharded, local_numel
from cfp.propagate import BlockStrategy

aten = torch.ops.aten
NO_TRAFFIC = {  # besides views (anchors.is_view)
    operator.getitem,
    aten.unbind.int,
    aten.split.Tensor,
    aten.chunk.default,
    aten.split_with_sizes.default,
}


def _itemsize(dtype: str) -> int:
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise CFPError(f"Unknown dtype {dtype!r} in a transition.")
    return dt.itemsize


def redistribute_collectives(key: TransitionKey, mesh: MeshSpec) -> list[tuple[str, int, float, str]]:
    """The collectives moving a value from ``key.src`` to ``key.dst``: (kind, mesh dim, input bytes per rank, phase).

    Per mesh dimension, as DTensor's redistribute does: Shard->Replicate is an
    all_gather (backward: reduce_scatter), Partial->Replicate an all_reduce
    (backward: nothing), Partial->Shard a reduce_scatter (backward:
    all_gather), Shard(i)->Shard(j) an all_to_all (both ways),
    Replicate->Shard a local slice (backward: all_gather of the gradient),
    Replicate->Partial nothing. Gathers run first, then the rest, each on the
    local size at that point.
    """
    if key.is_noop:
        return []
    size = _itemsize(key.dtype)
    current = list(key.src)
    out: list[tuple[str, int, float, str]] = []
    dims = range(mesh.ndim)
    # Gathering and reducing dims first keeps the later steps on the right sizes.
    order = sorted(dims, key=lambda i: 0 if key.dst[i].is_replicate() else 1)
    for i in order:
        src, dst = current[i], key.dst[i]
        if src == dst or mesh.shape[i] == 1:
            current[i] = dst
            continue
        n = mesh.shape[i]
        local = float(local_numel(key.shape, current, mesh.shape) * size)
        if is_sharded(src) and dst.is_replicate():
            out += [("all_gather", i, local, "forward"), ("reduce_scatter", i, local * n, "backward")]
        elif is_sharded(src) and dst.is_partial():
            out += [("all_gather", i, local, "forward")]
        elif src.is_partial() and dst.is_replicate():
            out += [("all_reduce", i, local, "forward")]
        elif src.is_partial() and is_sharded(dst):
            out += [("reduce_scatter", i, local, "forward"), ("all_gather", i, local / n, "backward")]
        elif src.is_partial() and dst.is_partial():  # a different reduce op: reduce, then re-partial for free
            out += [("all_reduce", i, local, "forward")]
        elif is_sharded(src) and is_sharded(dst):
            out += [("all_to_all", i, local, "forward"), ("all_to_all", i, local, "backward")]
        elif src.is_replicate() and is_sharded(dst):
            out += [("all_gather", i, local / n, "backward")]
        # Replicate -> Partial: a local op, and its gradient is replicated.
        current[i] = dst
    return out


class AnalyticCosts:
    """The CostModel of FLOPs, bytes and alpha-beta collectives on a cluster model."""

    name = "analytic"

    def __init__(self, graph, cluster: ClusterModel):
        self.graph = graph
        self.cluster = cluster
        self.mesh: MeshSpec = graph.mesh
        self._strategies: dict[tuple[str, str], BlockStrategy] = {}
        for class_id, strategies in graph.strategies.items():
            for strategy in strategies:
                self._strategies[(class_id, strategy.config.name)] = strategy
        self._blocks: dict[tuple[str, str], BlockCost] = {}
        self._transitions: dict[TransitionKey, float] = {}

    # -- blocks -----------------------------------------------------------
    def block_cost(self, class_id: str, config: str) -> BlockCost:
        key = (class_id, config)
        if key not in self._blocks:
            strategy = self._strategies.get(key)
            if strategy is None:
                self._blocks[key] = BlockCost(math.inf, 0.0)
            else:
                block = self.graph.blocks[self.graph.classes[class_id][0]]
                self._blocks[key] = BlockCost(self._compute(block, strategy), self._communication(strategy))
        return self._blocks[key]

    def block_time(self, class_id: str, config: str) -> float:
        return self.block_cost(class_id, config).total_s

    def block_phase_s(self, class_id: str, config: str, phase: str) -> float:
        """One phase of a block, as profiled rows split it: ``forward`` (a third of the compute and the
        forward collectives), ``reduce`` (the bucketed gradient reductions) or ``optimizer`` (not modelled: 0)."""
        cost = self.block_cost(class_id, config)
        strategy = self._strategies.get((class_id, config))
        if strategy is None or phase == "optimizer":
            return 0.0
        if phase == "forward":
            forward = [c for c in strategy.collectives if c.phase == "forward"]
            priced = (self.cluster.collective_time(c.kind, c.bytes, self.mesh, self._dim(c)) for c in forward)
            return cost.compute_s / 3 + sum(priced)
        if phase == "reduce":
            return self._communication(strategy, phases=("reduce",))
        raise ValueError(f"unknown phase {phase!r}")

    def _dim(self, c) -> int:
        if 0 <= c.mesh_dim < self.mesh.ndim:
            return c.mesh_dim
        return max(range(self.mesh.ndim), key=lambda i: self.mesh.shape[i])

    def _compute(self, block, strategy: BlockStrategy) -> float:
        traced = self.graph.traced
        placements = dict(zip(block.nodes, strategy.node_placements))
        param_bytes_left = float(strategy.param_bytes)  # read once, by the anchor
        total = 0.0
        for name in block.nodes:
            node = traced.nodes[name]
            pl = placements.get(name)
            if pl is None:  # a multi-output op: its outputs' placements stand for it
                pl = next((placements[u.name] for u in node.users if placements.get(u.name) is not None), None)
            factor = 1
            if pl is not None:
                for n, p in zip(self.mesh.shape, pl):
                    if is_sharded(p) or p.is_partial():
                        factor *= n
            flops = traced.flops.get(name, 0) / factor
            val = node.meta.get("val")
            vals = [v for v in (val if isinstance(val, (tuple, list)) else [val]) if isinstance(v, torch.Tensor)]
            if node.target in NO_TRAFFIC or is_view(node) or not vals:
                out_bytes = 0.0
            else:
                shard = 1
                if pl is not None:
                    for n, p in zip(self.mesh.shape, pl):
                        if is_sharded(p):
                            shard *= n
                out_bytes = sum(v.numel() * v.element_size() for v in vals) / shard
            moved = 2 * out_bytes
            if name == block.anchor:
                moved += param_bytes_left
            if flops == 0 and moved == 0:
                continue
            dtype = str(vals[0].dtype).removeprefix("torch.") if vals else "float32"
            total += self.cluster.compute_time(3 * flops, 3 * moved, dtype)
        return total

    def _communication(self, strategy: BlockStrategy, phases=("forward", "backward", "reduce")) -> float:
        """Forward and backward collectives one by one; the gradient reductions of a block bucketed.

        Gradient reductions of one kind on one mesh dimension are fused into
        one collective (as DDP and FSDP bucket gradients): one latency, their
        bytes summed.
        """
        total = 0.0
        buckets: dict[tuple[str, int], float] = {}
        for c in strategy.collectives:
            if c.phase not in phases:
                continue
            dim = self._dim(c)
            if c.phase == "reduce":
                buckets[(c.kind, dim)] = buckets.get((c.kind, dim), 0.0) + c.bytes
            else:
                total += self.cluster.collective_time(c.kind, c.bytes, self.mesh, dim)
        for (kind, dim), nbytes in buckets.items():
            total += self.cluster.collective_time(kind, nbytes, self.mesh, dim)
        return total

    # -- transitions ------------------------------------------------------
    def transition_time(self, key: TransitionKey) -> float:
        if key.is_noop:
            return 0.0
        if key not in self._transitions:
            self._transitions[key] = sum(
                self.cluster.collective_time(kind, nbytes, self.mesh, dim)
                for kind, dim, nbytes, _ in redistribute_collectives(key, self.mesh)
            )
        return self._transitions[key]

    def transition_phase_s(self, key: TransitionKey, phase: str) -> float:
        """The ``forward`` or ``backward`` collectives of a transition, priced."""
        return sum(
            self.cluster.collective_time(kind, nbytes, self.mesh, dim)
            for kind, dim, nbytes, ph in redistribute_collectives(key, self.mesh)
            if ph == phase
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "cluster": self.cluster.name,
            "device": self.cluster.device_kind,
            "backend": "analytic",
        }


@register_cost_model("analytic")
def analytic_costs(graph, setup: CostSetup) -> AnalyticCosts:
    if setup.cluster is None:
        raise CFPError("The analytic cost model needs a cluster model (--cluster NAME or FILE).")
    return AnalyticCosts(graph, setup.cluster)
