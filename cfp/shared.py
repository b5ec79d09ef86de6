"""Saved tensors that several blocks share: count each once.

Each block's saved activations are measured alone (``BlockStrategy.saved_bytes``),
so a tensor that crosses blocks is counted by every end that saves it: llama's
q, k and v projections each save the normalised input, and the attention
probabilities are saved by the softmax that makes them and by the matmul that
reads them (17% of llama's predicted peak). Where a consumer takes the value
with the placements the producer left it in, no transition copies it and both
hold one tensor; where a transition runs, the consumer saves its own copy.

A recomputed block saves none of its own tensors but keeps all its inputs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from cfp.costs import ValueEdge, value_edges
from cfp.placements import Placements, local_numel, normalize


@dataclass
class SharedValue:
    """A tensor one block makes and others read, each of whom may save it for backward."""

    edges: list[ValueEdge]  # one per consumer, all from the same exit

    @property
    def producer(self):
        return self.edges[0].producer

    @property
    def last_consumer(self) -> int:
        return max(edge.consumer.id for edge in self.edges)

    @property
    def exit_pos(self) -> int:
        return self.edges[0].exit_pos

    def nbytes(self, label: Placements, mesh_shape) -> int:
        value = self.edges[0].value
        return local_numel(value.shape, label, mesh_shape) * value.element_size()

    def exit_label(self, graph, config: int) -> Placements | None:
        return normalize(graph.block_strategies(self.producer)[config].exit_placements[self.exit_pos])

    def producer_saves(self, graph, config: int, recomputed: bool) -> bool:
        """The producer's saved tensors hold the value itself under ``config`` (a recomputed block keeps none)."""
        saved = graph.block_strategies(self.producer)[config].saved_exits
        return not recomputed and self.exit_pos < len(saved) and saved[self.exit_pos]

    @staticmethod
    def input_label(graph, edge: ValueEdge, config: int) -> Placements | None:
        return normalize(graph.block_strategies(edge.consumer)[config].input_placements[edge.input_pos])

    @staticmethod
    def consumer_saves(graph, edge: ValueEdge, config: int) -> bool:
        """The consumer's saved tensors hold the value it takes under ``config`` (when it does not recompute)."""
        saved = graph.block_strategies(edge.consumer)[config].saved_inputs
        return edge.input_pos < len(saved) and saved[edge.input_pos]


def shared_values(graph) -> list[SharedValue]:
    """Every tensor that crosses blocks, with the edges to its consumers."""
    by_exit: dict[tuple[int, int], list[ValueEdge]] = defaultdict(list)
    for edge in value_edges(graph):
        by_exit[edge.producer.id, edge.exit_pos].append(edge)
    return [SharedValue(edges) for edges in by_exit.values()]


def counted_twice(
    graph, values: list[SharedValue], choice: list[int], recomputed: list[bool], kept_inputs: bool = True
) -> list[int]:
    """Per block, bytes the blocks' saved activations count more than once under a plan: for each shared
    value, every end that saves the producer's very tensor beyond the first, given back at its last consumer
    (from there on in backward order, every holder has saved it). ``values``: ``shared_values(graph)``.
    ``kept_inputs=False``: a recomputed block's kept inputs are not given back (the ILP's count)."""
    mesh_shape = tuple(graph.mesh.shape)
    out = [0] * len(graph.blocks)
    for value in values:
        p = value.producer.id
        label = value.exit_label(graph, choice[p])
        if label is None:
            continue
        holders = int(value.producer_saves(graph, choice[p], recomputed[p]))
        for edge in value.edges:
            c = edge.consumer.id
            holds = kept_inputs if recomputed[c] else value.consumer_saves(graph, edge, choice[c])
            holders += int(holds and value.input_label(graph, edge, choice[c]) == label)
        out[value.last_consumer] += max(0, holders - 1) * value.nbytes(label, mesh_shape)
    return out
