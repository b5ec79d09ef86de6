"""Analysis: a traced model and a mesh become a ``BlockGraph``.

Blocks are cut, classed and grouped into segments; each class's candidate
configs are propagated once, on its first block, over a fake process group.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cfp.blocks import Block, edges, partition
from cfp.capture import TracedModel
from cfp.configs import candidates
from cfp.errors import CFPError
from cfp.mesh import MeshSpec, fake_mesh
from cfp.propagate import Propagation, propagate
from cfp.segments import Segment, classify, find_segments


@dataclass
class BlockGraph:
    """Blocks, their classes and segments, and each class's propagated configs."""

    traced: TracedModel
    mesh: MeshSpec
    blocks: list[Block]
    classes: dict[str, list[int]]  # class id -> block ids
    segments: list[Segment]
    configs: dict[str, list[Propagation]]  # class id -> valid configs, propagated
    rejected: dict[str, list[Propagation]] = field(default_factory=dict)  # class id -> configs DTensor refused
    seconds: float = 0.0

    def block_configs(self, block: Block | int) -> list[Propagation]:
        block = self.blocks[block] if isinstance(block, int) else block
        return self.configs[block.class_id]

    def edges(self) -> list[tuple[int, int, str]]:
        return edges(self.blocks)

    @property
    def profile_jobs(self) -> int:
        return sum(len(c) for c in self.configs.values())

    def search_space(self) -> dict[str, float]:
        """log10 of the number of plans, three ways.

        - operator_level: every op output may take any placement per mesh
          dimension (replicate or shard any dim), as an operator-level search faces;
        - block_level: one config per block;
        - deduplicated: one config per block class within repeated segments
          (what is left to decide once repeated layers are tied), and per block elsewhere.
        """
        operator_level = 0.0
        for node in self.traced.ops():
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                operator_level += self.mesh.ndim * math.log10(val.dim() + 1)
        block_level = sum(math.log10(len(self.block_configs(b))) for b in self.blocks)
        in_segment = {b for s in self.segments for b in range(s.start, s.end)}
        deduplicated = sum(math.log10(len(self.configs[c])) for s in self.segments for c in s.classes)
        deduplicated += sum(math.log10(len(self.block_configs(b))) for b in self.blocks if b.id not in in_segment)
        return {"operator_level": operator_level, "block_level": block_level, "deduplicated": deduplicated}


def analyze(traced: TracedModel, mesh: MeshSpec, progress=None) -> BlockGraph:
    """Cut, class and propagate. ``progress(done, total)`` is called per class."""
    start = time.perf_counter()
    try:
        blocks = partition(traced)
    except ValueError as exc:
        raise CFPError(f"Cannot cut the model into ParallelBlocks: {exc}.") from exc
    classes = classify(blocks, traced)
    segments = find_segments([b.class_id for b in blocks])
    configs: dict[str, list[Propagation]] = {}
    rejected: dict[str, list[Propagation]] = {}
    with fake_mesh(mesh) as device_mesh:
        for done, (class_id, members) in enumerate(classes.items()):
            representative = blocks[members[0]]
            results = [propagate(representative, c, traced, device_mesh) for c in candidates(representative, traced, mesh.shape)]
            configs[class_id] = [r for r in results if r.valid]
            rejected[class_id] = [r for r in results if not r.valid]
            if not configs[class_id]:
                reasons = "; ".join(f"{r.config.name}: {r.reason}" for r in results[:3])
                raise CFPError(
                    f"Block {representative.anchor} ({traced.nodes[representative.anchor].target}) has no config "
                    f"DTensor can run on mesh {mesh}: {reasons}"
                )
            if progress is not None:
                progress(done + 1, len(classes))
    return BlockGraph(traced, mesh, blocks, classes, segments, configs, rejected, time.perf_counter() - start)
