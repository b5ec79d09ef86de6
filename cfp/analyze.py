"""Analysis: a traced model and a mesh become a ``BlockGraph``.

Blocks are cut, classed and grouped into segments; each class's candidate
configs are propagated once, on its first block, over a fake process group.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import pickle
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cfp.blocks import Block, partition
from cfp.capture import TracedModel
from cfp.configs import candidates
from cfp.errors import CFPError
from cfp.mesh import MeshSpec, fake_mesh, parse_mesh
from cfp.propagate import Propagation, propagate
from cfp.segments import Segment, classify, find_segments, structure_key


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
    cached_classes: int = 0  # classes whose propagation came from the on-disk cache

    def block_configs(self, block: Block | int) -> list[Propagation]:
        block = self.blocks[block] if isinstance(block, int) else block
        return self.configs[block.class_id]

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


def analyze(traced: TracedModel, mesh: MeshSpec | str, progress=None, workers: int | None = None) -> BlockGraph:
    """Cut, class and propagate. ``progress(done, total)`` is called per class.

    Classes are propagated in ``workers`` forked processes (default: one per
    core); DTensor's sharding propagation is CPU-bound Python, and a class's
    configs share its caches, so a class is the unit of work.
    """
    start = time.perf_counter()
    mesh = parse_mesh(mesh)
    try:
        blocks = partition(traced)
    except ValueError as exc:
        raise CFPError(f"Cannot cut the model into ParallelBlocks: {exc}.") from exc
    classes = classify(blocks, traced)
    segments = find_segments([b.class_id for b in blocks])
    representatives = [blocks[members[0]] for members in classes.values()]
    results = [_load_cached(block, traced, mesh) for block in representatives]
    todo = [block for block, cached in zip(representatives, results) if cached is None]
    tick = (lambda done: progress(len(representatives) - len(todo) + done, len(representatives))) if progress else None
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if workers > 1:
        computed = _propagate_in_workers(todo, traced, mesh, workers, tick)
    else:
        computed = []
        if todo:
            with fake_mesh(mesh) as device_mesh:
                for done, block in enumerate(todo):
                    computed.append(_propagate_class(block, traced, mesh, device_mesh))
                    if tick is not None:
                        tick(done + 1)
    for block, props in zip(todo, computed):
        _store_cached(block, traced, mesh, props)
    fresh = iter(computed)
    results = [cached if cached is not None else next(fresh) for cached in results]
    configs: dict[str, list[Propagation]] = {}
    rejected: dict[str, list[Propagation]] = {}
    for block, props in zip(representatives, results):
        configs[block.class_id] = [p for p in props if p.valid]
        rejected[block.class_id] = [p for p in props if not p.valid]
        if not configs[block.class_id]:
            reasons = "; ".join(f"{p.config.name}: {p.reason}" for p in props[:3])
            raise CFPError(
                f"Block {block.anchor} ({traced.nodes[block.anchor].target}) has no config "
                f"DTensor can run on mesh {mesh}: {reasons}"
            )
    return BlockGraph(
        traced, mesh, blocks, classes, segments, configs, rejected, time.perf_counter() - start, len(representatives) - len(todo)
    )


# Propagation depends only on a block's structure, the mesh and torch's DTensor,
# so it is cached on disk: every command that re-analyses a model (plan,
# profile workers, bench) then skips DTensor's slow first propagation.
ANALYSIS_CACHE_VERSION = 5  # bump when a Propagation's contents change; the history is in git


def cache_dir() -> Path:
    return Path(os.environ.get("CFP_CACHE_DIR", Path.home() / ".cache" / "cfp")) / "analysis"


def _cache_path(block: Block, traced: TracedModel, mesh: MeshSpec) -> Path:
    key = repr((ANALYSIS_CACHE_VERSION, torch.__version__, mesh.shape, structure_key(block, traced)))
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pkl"


def _load_cached(block: Block, traced: TracedModel, mesh: MeshSpec) -> list[Propagation] | None:
    path = _cache_path(block, traced, mesh)
    try:
        with open(path, "rb") as f:
            stored = pickle.load(f)
        names, props = stored["inputs"], stored["propagations"]
    except FileNotFoundError:
        return None
    except Exception:  # a damaged entry is recomputed
        path.unlink(missing_ok=True)
        return None
    # The entry was made on a block of the same structure, maybe another instance:
    # its configs name that block's parameters, which correspond by position.
    rename = dict(zip(names, (i.name for i in block.inputs)))
    for prop in props:
        prop.config = replace(prop.config, params=tuple((rename[n], p) for n, p in prop.config.params))
    return props


def _store_cached(block: Block, traced: TracedModel, mesh: MeshSpec, props: list[Propagation]) -> None:
    path = _cache_path(block, traced, mesh)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"inputs": [i.name for i in block.inputs], "propagations": props}, f)
    os.replace(tmp, path)


def _propagate_class(block: Block, traced: TracedModel, mesh: MeshSpec, device_mesh) -> list[Propagation]:
    return [propagate(block, c, traced, device_mesh) for c in candidates(block, traced, mesh.shape)]


# Forked workers inherit the traced model instead of pickling an ExportedProgram.
_WORKER_STATE: dict = {}


def _worker_init() -> None:
    _WORKER_STATE["context"] = fake_mesh(_WORKER_STATE["mesh"])
    _WORKER_STATE["device_mesh"] = _WORKER_STATE["context"].__enter__()


def _worker_run(block: Block) -> list[Propagation]:
    return _propagate_class(block, _WORKER_STATE["traced"], _WORKER_STATE["mesh"], _WORKER_STATE["device_mesh"])


def _propagate_in_workers(blocks: list[Block], traced: TracedModel, mesh: MeshSpec, workers: int, progress) -> list[list[Propagation]]:
    _WORKER_STATE.update(traced=traced, mesh=mesh)
    # Largest classes first, so the slowest one does not start last.
    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i].nodes))
    results: list[list[Propagation] | None] = [None] * len(blocks)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
            pending = {i: pool.apply_async(_worker_run, (blocks[i],)) for i in order}
            for done, i in enumerate(order):
                results[i] = pending[i].get()
                if progress is not None:
                    progress(done + 1)
    finally:
        _WORKER_STATE.clear()
    return results
