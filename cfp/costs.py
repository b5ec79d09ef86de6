"""The interface between costing (profiled or analytic) and the ILP.

A cost model prices two things: one block instance under one config
(forward, backward and the reduction of its parameters' gradients), and one
*transition*, the redistribution of a value between the placements its
producer leaves it in and those its consumer needs, forward and backward.

Cost models are found by name in ``COST_MODELS``: ``register_cost_model``
adds one, and ``cfp plan --cost NAME``, ``cfp.plan(..., cost=NAME)`` and
``cfp bench --plans NAME`` then use it. ``analytic`` registers in
``cfp.analytic``, ``profiled`` in ``cfp.correction``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cfp.placements import Placements, normalize

if TYPE_CHECKING:
    from cfp.analyze import BlockGraph
    from cfp.blocks import Block
    from cfp.cluster import ClusterModel
    from cfp.spec import ModelSpec


@dataclass(frozen=True)
class TransitionKey:
    """One redistribution: a global shape and dtype moved from ``src`` to ``dst`` placements.

    Placements are ``cfp.placements.canonical``, so two keys that the profile
    store writes alike compare equal.
    """

    shape: tuple[int, ...]
    dtype: str
    src: Placements  # e.g. (Shard(0), Partial("sum"))
    dst: Placements

    @property
    def is_noop(self) -> bool:
        return self.src == self.dst


@dataclass(frozen=True)
class BlockCost:
    """One block instance under one config, split into compute and communication."""

    compute_s: float
    communication_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s


@dataclass(frozen=True)
class EdgeTransition:
    """The transition on one graph edge when its producer and consumer take given configs."""

    producer: int  # block id
    consumer: int  # block id
    value: str  # node name
    producer_config: int  # index into graph.block_strategies(producer)
    consumer_config: int  # index into graph.block_strategies(consumer)
    key: TransitionKey


class CostModel(Protocol):
    """What the ILP, the baselines and the plan file read. A model that can split a block's time into compute
    and communication also has ``block_cost(class_id, config) -> BlockCost``; plan files then record the split."""

    name: str

    def block_time(self, class_id: str, config: str) -> float:
        """Seconds for one instance of the class under the named config; ``math.inf`` if it cannot run."""

    def transition_time(self, key: TransitionKey) -> float:
        """Seconds to move a value between placements, forward and backward."""

    def describe(self) -> dict[str, Any]:
        """What a plan's ``provenance`` records of these costs (backend, device, cluster, ...)."""


@dataclass(frozen=True, kw_only=True)
class CostSetup:
    """What a cost model is built from besides the BlockGraph (the plan driver fills it in)."""

    spec: ModelSpec | None  # the model, to rebuild it where blocks run; None for a model given already traced
    cluster: ClusterModel | None  # None where costs measured on this machine describe it
    backend: str  # the profiling backend, for models that measure
    progress: Callable | None = None  # profiling's on_progress(done, cached, total, job)
    runtime: str = "lowered"  # how profiled programs run: lowered, or compiled by inductor (cfp.profile.RUNTIMES)


@dataclass(frozen=True)
class CostModelEntry:
    build: Callable[[BlockGraph, CostSetup], CostModel]
    measures: bool  # runs the model's blocks, so the model is built on its device (not meta) before analysis


COST_MODELS: dict[str, CostModelEntry] = {}


def register_cost_model(name: str, *, measures: bool = False):
    """``@register_cost_model("mine")`` on a class whose constructor takes ``(graph, setup: CostSetup)`` (or on
    a function of those returning a CostModel) makes it ``--cost mine``. ``measures``: it times the model's
    blocks, so the model must be built on a real device."""

    def register(build):
        COST_MODELS[name] = CostModelEntry(build, measures)
        return build

    return register


def measured_here(cost: str, backend: str) -> bool:
    """Costs measured on this machine's real backend describe this machine; every other model, a cluster."""
    entry = COST_MODELS.get(cost)
    return entry is not None and entry.measures and backend == "real"


@dataclass(frozen=True)
class ValueEdge:
    """A tensor one block produces and another reads: where a transition can happen."""

    producer: Block
    consumer: Block
    input_pos: int  # index into consumer.inputs
    exit_pos: int  # index into producer.outputs
    value: torch.Tensor  # the traced value (shape and dtype)

    def key(self, src: Placements, dst: Placements) -> TransitionKey:
        return TransitionKey(
            tuple(self.value.shape), str(self.value.dtype).removeprefix("torch."), normalize(src), normalize(dst)
        )


def value_edges(graph: BlockGraph) -> Iterator[ValueEdge]:
    """Every tensor that crosses from one block to another, residual edges included."""
    for block in graph.blocks:
        for pos, value in enumerate(block.inputs):
            if value.producer is None:
                continue
            val = graph.traced.nodes[value.name].meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            producer = graph.blocks[value.producer]
            yield ValueEdge(producer, block, pos, producer.outputs.index(value.name), val)


def edge_transitions(graph: BlockGraph) -> Iterator[EdgeTransition]:
    """Every (edge, producer config, consumer config) and the transition it implies."""
    for edge in value_edges(graph):
        for a, strategy_a in enumerate(graph.block_strategies(edge.producer)):
            src = strategy_a.exit_placements[edge.exit_pos]
            for b, strategy_b in enumerate(graph.block_strategies(edge.consumer)):
                dst = strategy_b.input_placements[edge.input_pos]
                if src is None or dst is None:
                    continue
                key = edge.key(src, dst)
                yield EdgeTransition(
                    edge.producer.id, edge.consumer.id, edge.producer.outputs[edge.exit_pos], a, b, key
                )


def unique_transitions(graph: BlockGraph) -> set[TransitionKey]:
    """The distinct non-trivial transitions a plan of this graph can need."""
    return {t.key for t in edge_transitions(graph) if not t.key.is_noop}


def shared_parameters(graph: BlockGraph) -> dict[str, list[tuple[int, int]]]:
    """Parameters read by more than one block (tied weights) -> (block id, input position) of each read."""
    readers: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for block in graph.blocks:
        for pos, inp in enumerate(block.inputs):
            if inp.name in graph.traced.params:
                readers[inp.name].append((block.id, pos))
    return {name: r for name, r in readers.items() if len(r) > 1}
