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
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cfp.blocks import Block, partition, prologue
from cfp.capture import TracedModel
from cfp.children import die_with_parent
from cfp.configs import candidates
from cfp.errors import CFPError, CFPWarning
from cfp.mesh import MeshSpec, fake_mesh, parse_mesh, refuse_real_group
from cfp.propagate import BlockStrategy, propagate
from cfp.segments import Segment, classify, find_segments, structure_key


@dataclass
class BlockGraph:
    """Blocks, their classes and segments, and each class's propagated configs."""

    traced: TracedModel
    mesh: MeshSpec
    blocks: list[Block]
    classes: dict[str, list[int]]  # class id -> block ids; ``class_of`` goes the other way
    segments: list[Segment]
    strategies: dict[str, list[BlockStrategy]]  # class id -> its valid configs, propagated
    rejected: dict[str, list[BlockStrategy]] = field(default_factory=dict)  # class id -> configs DTensor refused
    seconds: float = 0.0
    cached_classes: int = 0  # classes whose propagation came from the on-disk cache
    prologue: list[str] = field(default_factory=list)  # ops no parameter reaches: run once, replicated

    def __post_init__(self) -> None:
        self._class_of = {b: class_id for class_id, members in self.classes.items() for b in members}

    def class_of(self, block: Block | int) -> str:
        """The structural class of a block (or block id)."""
        return self._class_of[block if isinstance(block, int) else block.id]

    def replicated_ops(self) -> dict[str, list[str]]:
        """Ops run replicated (DTensor has no rule, or their fake kernel fails) -> the configs, as
        ``class:config``, under which they are."""
        out: dict[str, list[str]] = {}
        for class_id, strategies in self.strategies.items():
            for strategy in strategies:
                for op in dict.fromkeys(strategy.fallbacks):
                    out.setdefault(op, []).append(f"{class_id}:{strategy.config.name}")
        return out

    def block_strategies(self, block: Block | int) -> list[BlockStrategy]:
        return self.strategies[self.class_of(block)]

    @property
    def profile_jobs(self) -> int:
        return sum(len(c) for c in self.strategies.values())

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
        block_level = sum(math.log10(len(self.block_strategies(b))) for b in self.blocks)
        in_segment = {b for s in self.segments for b in range(s.start, s.end)}
        deduplicated = sum(math.log10(len(self.strategies[c])) for s in self.segments for c in s.classes)
        deduplicated += sum(math.log10(len(self.block_strategies(b))) for b in self.blocks if b.id not in in_segment)
        return {"operator_level": operator_level, "block_level": block_level, "deduplicated": deduplicated}


def analyze(traced: TracedModel, mesh: MeshSpec | str, progress=None, workers: int | None = None) -> BlockGraph:
    """Cut, class and propagate. ``progress(done, total)`` counts candidate configs, called as each is propagated
    (a class can take minutes on a 3-D mesh, so per-class progress would give no ETA for long).

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
    class_of = {b: class_id for class_id, members in classes.items() for b in members}
    segments = find_segments([class_of[b.id] for b in blocks])
    representatives = [blocks[members[0]] for members in classes.values()]
    results = [_load_cached(block, traced, mesh) for block in representatives]
    todo = [block for block, cached in zip(representatives, results) if cached is None]
    tick = None
    if progress is not None:
        total = sum(len(candidates(block, traced, mesh.shape)) for block in representatives)
        done = [sum(len(strategies) for strategies in results if strategies is not None)]

        def tick(n: int = 1) -> None:
            done[0] += n
            progress(done[0], total)

        tick(0)
    if todo:
        refuse_real_group()  # here, not in a forked worker's initializer, which a pool would retry forever
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if workers > 1:
        computed = _propagate_in_workers(todo, traced, mesh, workers, tick)
    else:
        computed = []
        if todo:
            with fake_mesh(mesh) as device_mesh:
                for block in todo:
                    computed.append(_propagate_class(block, traced, mesh, device_mesh, tick))
    for block, strategies in zip(todo, computed):
        _store_cached(block, traced, mesh, strategies)
    fresh = iter(computed)
    results = [cached if cached is not None else next(fresh) for cached in results]
    valid: dict[str, list[BlockStrategy]] = {}
    rejected: dict[str, list[BlockStrategy]] = {}
    for class_id, block, strategies in zip(classes, representatives, results):
        valid[class_id] = [p for p in strategies if p.valid]
        rejected[class_id] = [p for p in strategies if not p.valid]
        if not valid[class_id]:
            reasons = "; ".join(f"{p.config.name}: {p.reason}" for p in strategies[:3])
            raise CFPError(
                f"Block {block.anchor} ({traced.nodes[block.anchor].target}) has no config "
                f"DTensor can run on mesh {mesh}: {reasons}"
            )
    warn_unshardable(valid, mesh)
    return BlockGraph(
        traced,
        mesh,
        blocks,
        classes,
        segments,
        valid,
        rejected,
        time.perf_counter() - start,
        len(representatives) - len(todo),
        prologue=prologue(traced),
    )


class NothingToShardWarning(CFPWarning):
    """A mesh dimension across which no config of any block shards anything."""


def warn_unshardable(configs: dict[str, list[BlockStrategy]], mesh: MeshSpec) -> None:
    """Say so when every config replicates across a mesh dimension: its devices would all compute the same thing."""
    for dim, (name, size) in enumerate(zip(mesh.names, mesh.shape)):
        if size > 1 and all(
            p.config.name.split("/")[dim] == "rep" for strategies in configs.values() for p in strategies
        ):
            warnings.warn(
                f"Nothing in this model can be sharded across mesh dimension {name} ({size} devices): no dimension of "
                f"any block's activations or parameters divides evenly by {size}. Every plan replicates the model "
                f"across it, so its devices all compute the same thing (the 'dp' baseline too). Choose a mesh whose "
                f"sizes divide the batch or the model's widths.",
                NothingToShardWarning,
                stacklevel=3,
            )


# BlockStrategy depends only on a block's structure, the mesh and torch's DTensor,
# so it is cached on disk: every command that re-analyses a model (plan,
# profile workers, bench) then skips DTensor's slow first propagation.
ANALYSIS_CACHE_VERSION = 19  # bump when a BlockStrategy's contents change; the history is in git


def cache_dir() -> Path:
    return Path(os.environ.get("CFP_CACHE_DIR", Path.home() / ".cache" / "cfp")) / "analysis"


def _cache_path(block: Block, traced: TracedModel, mesh: MeshSpec) -> Path:
    key = repr((ANALYSIS_CACHE_VERSION, torch.__version__, mesh.shape, structure_key(block, traced)))
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pkl"


def _load_cached(block: Block, traced: TracedModel, mesh: MeshSpec) -> list[BlockStrategy] | None:
    path = _cache_path(block, traced, mesh)
    try:
        with open(path, "rb") as f:
            stored = pickle.load(f)
        names, strategies = stored["inputs"], stored["strategies"]
    except FileNotFoundError:
        return None
    except Exception:  # a damaged entry is recomputed
        path.unlink(missing_ok=True)
        return None
    # The entry was made on a block of the same structure, maybe another instance:
    # its configs name that block's parameters, which correspond by position.
    rename = dict(zip(names, (i.name for i in block.inputs)))
    for strategy in strategies:
        strategy.config = replace(strategy.config, params=tuple((rename[n], p) for n, p in strategy.config.params))
    return strategies


def _store_cached(block: Block, traced: TracedModel, mesh: MeshSpec, strategies: list[BlockStrategy]) -> None:
    path = _cache_path(block, traced, mesh)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"inputs": [i.name for i in block.inputs], "strategies": strategies}, f)
    os.replace(tmp, path)


def _propagate_class(block: Block, traced: TracedModel, mesh: MeshSpec, device_mesh, tick=None) -> list[BlockStrategy]:
    strategies = []
    for config in candidates(block, traced, mesh.shape):
        strategies.append(propagate(block, config, traced, device_mesh))
        if tick is not None:
            tick()
    return strategies


# Forked workers inherit the traced model instead of pickling an ExportedProgram.
_WORKER_STATE: dict = {}


def _worker_init(parent_pid: int) -> None:
    # A forked worker inherits the CLI's SIGTERM handler (exit_on_sigterm); Pool.terminate needs SIGTERM to kill it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)
    _WORKER_STATE["context"] = fake_mesh(_WORKER_STATE["mesh"])
    _WORKER_STATE["device_mesh"] = _WORKER_STATE["context"].__enter__()


def _worker_run(block: Block) -> list[BlockStrategy]:
    ticks = _WORKER_STATE["ticks"]
    return _propagate_class(
        block, _WORKER_STATE["traced"], _WORKER_STATE["mesh"], _WORKER_STATE["device_mesh"], lambda: ticks.put(1)
    )


def _propagate_in_workers(
    blocks: list[Block], traced: TracedModel, mesh: MeshSpec, workers: int, progress
) -> list[list[BlockStrategy]]:
    ctx = multiprocessing.get_context("fork")
    ticks = ctx.SimpleQueue()  # one item per propagated config, for progress
    _WORKER_STATE.update(traced=traced, mesh=mesh, ticks=ticks)
    # Largest classes first, so the slowest one does not start last.
    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i].nodes))
    try:
        with ctx.Pool(workers, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            pending = [pool.apply_async(_worker_run, (blocks[i],)) for i in order]
            finished = False
            while not finished:
                finished = all(p.ready() for p in pending)
                while not ticks.empty():
                    ticks.get()
                    if progress is not None:
                        progress()
                time.sleep(0.1)
            results = dict(zip(order, (p.get() for p in pending)))
    finally:
        _WORKER_STATE.clear()
    return [results[i] for i in range(len(blocks))]
