"""Gradient buckets: how the lowered step reduces gradients, and what a block's share of it costs.

The lowered backward reduces the gradients of all blocks together, in flat
buckets of up to ``BUCKET_MB`` (``lower.bucket_collectives``, as DDP). A
block profiled alone reduces its own gradients, one call per parameter,
each paying the backend's fixed cost per call: on data-parallel gpt:small
(2 gloo ranks) the blocks' reductions summed to 105 ms where the step
spends about 20. So profiling also times one full bucket's all-reduce per
mesh dimension (``bucket_key``), and a block's reduction is priced at that
bucket's time per byte (``ProfileTable``). One bucket's flat copy is also
what the reduction adds to the step's memory (``solve.Memory.bucket``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Partial, Replicate

from cfp.costs import TransitionKey
from cfp.placements import replicated

if TYPE_CHECKING:
    from cfp.blocks import BlockGraph
    from cfp.propagate import BlockStrategy

BUCKET_MB = 25.0  # DDP's default bucket size
BUCKET_BYTES = int(BUCKET_MB * 2**20)


def bucket_key(ndim: int, dim: int) -> TransitionKey:
    """The all-reduce of one full fp32 bucket over mesh dimension ``dim``: what profiling times."""
    src = tuple(Partial("sum") if i == dim else Replicate() for i in range(ndim))
    return TransitionKey((BUCKET_BYTES // 4,), "float32", src, replicated(ndim))


def reduced_bytes(strategy: BlockStrategy) -> dict[int, int]:
    """Per mesh dimension, the gradient bytes a block reduces under ``strategy``."""
    out: dict[int, int] = {}
    for c in strategy.collectives:
        if c.phase == "reduce":
            out[max(c.mesh_dim, 0)] = out.get(max(c.mesh_dim, 0), 0) + c.bytes
    return out


def bucket_keys(graph: BlockGraph) -> set[TransitionKey]:
    """A bucket per mesh dimension some config reduces gradients over."""
    dims = {d for strategies in graph.strategies.values() for s in strategies for d in reduced_bytes(s)}
    return {bucket_key(graph.mesh.ndim, d) for d in dims}
