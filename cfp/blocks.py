"""ParallelBlocks: cut the captured graph at its anchor ops.

An *anchor* is an op that contracts an activation with a trainable parameter
(linear, addmm, matmul/mm/bmm/einsum with a parameter, embedding,
convolution): an op with a rule in ``cfp.anchors`` that reads both a
parameter (maybe through views, ``anchors.is_view``) and an activation. Each anchor
starts a block; every other op joins the block of its nearest anchor
producer, so the partition fixed at the anchor propagates through the block.

Ops that depend on no parameter form the *prologue* (position ids, causal
masks, rotary tables, shifted labels, constants): they belong to no block,
are offered no config, and run once, replicated, on plain tensors; a block
reads their values like graph inputs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from torch.fx import Node

from cfp.anchors import ANCHOR_RULES, NotAnAnchor, anchor_letters, param_root
from cfp.capture import TracedModel


@dataclass(frozen=True)
class BlockInput:
    """A value a block reads from outside itself."""

    name: str  # node name of the value
    producer: int | None  # block id of its producer; None for graph inputs, params, buffers and prologue values
    role: str  # "activation" (the anchor's), "param" (the anchor's), or "input" (anything else)


@dataclass
class Block:
    """A ParallelBlock; its structural class is the analysis's (``BlockGraph.class_of``)."""

    id: int
    anchor: str  # node name of the anchor op
    nodes: list[str]  # op nodes in graph order, the anchor among them
    inputs: list[BlockInput] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # nodes read by other blocks or the graph output
    params: list[str] = field(default_factory=list)  # parameter FQNs the block reads
    flops: int = 0

    def anchor_params(self) -> list[BlockInput]:
        return [i for i in self.inputs if i.role == "param"]


def is_anchor(node: Node, traced: TracedModel) -> bool:
    if node.op != "call_function" or node.target not in ANCHOR_RULES:
        return False
    tensors = [a for a in node.all_input_nodes]
    has_param = any(param_root(a, traced) is not None for a in tensors)
    has_activation = any(param_root(a, traced) is None for a in tensors)
    if not (has_param and has_activation):
        return False
    try:  # a parameter where its rule reads none (only a conv's bias) leaves the op to be propagated through
        anchor_letters(node, traced)
    except NotAnAnchor:
        return False
    return True


def prologue(traced: TracedModel) -> list[str]:
    """The ops, in graph order, that no parameter reaches: computed once, replicated, outside every block."""
    reached = set(traced.params)
    ops = []
    for node in traced.graph.nodes:
        if node.op != "call_function":
            continue
        if any(a.name in reached for a in node.all_input_nodes):
            reached.add(node.name)
        else:
            ops.append(node.name)
    return ops


def partition(traced: TracedModel) -> list[Block]:
    """Assign every op outside the prologue to a block, in graph order."""
    order = {n.name: i for i, n in enumerate(traced.graph.nodes)}
    outside = set(prologue(traced))
    owner: dict[str, int] = {}
    blocks: list[Block] = []
    pending: list[Node] = []  # ops with no anchor upstream: they join a consumer's block
    for node in traced.graph.nodes:
        if node.op != "call_function" or node.name in outside:
            continue
        if is_anchor(node, traced):
            block = Block(id=len(blocks), anchor=node.name, nodes=[])
            blocks.append(block)
            owner[node.name] = block.id
            continue
        producers = [owner[a.name] for a in node.all_input_nodes if a.name in owner]
        if producers:
            # The nearest anchor producer is the one that started last.
            owner[node.name] = max(producers, key=lambda b: order[blocks[b].anchor])
        else:
            pending.append(node)
    if not blocks:
        raise ValueError("the graph has no anchor op (no parameter is used in a contraction)")
    # A parameter's views join the block of the anchor that reads them; other
    # ops with no anchor upstream (computed from parameters alone) join the
    # block open where they stand in the graph, the first block if none is open yet.
    started = [order[b.anchor] for b in blocks]
    for node in reversed(pending):
        consumers = {owner[u.name] for u in node.users if u.name in owner}
        if param_root(node, traced) is not None and len(consumers) == 1:
            owner[node.name] = consumers.pop()
        else:
            owner[node.name] = max(bisect.bisect_right(started, order[node.name]) - 1, 0)
    for node in traced.graph.nodes:
        if node.name in owner:
            blocks[owner[node.name]].nodes.append(node.name)
    _connect(traced, blocks, owner)
    return blocks


def _connect(traced: TracedModel, blocks: list[Block], owner: dict[str, int]) -> None:
    """Fill in each block's external inputs, outputs, parameters and FLOPs."""
    for block in blocks:
        members = set(block.nodes)
        anchor = traced.nodes[block.anchor]
        anchor_param_args = {a.name for a in anchor.all_input_nodes if param_root(a, traced) is not None}
        anchor_params = {param_root(traced.nodes[a], traced).name for a in anchor_param_args}
        activation = next(a.name for a in anchor.all_input_nodes if param_root(a, traced) is None)
        seen: set[str] = set()
        for name in block.nodes:
            for arg in traced.nodes[name].all_input_nodes:
                if arg.name in members or arg.name in seen:
                    continue
                seen.add(arg.name)
                if arg.name == activation:
                    role = "activation"
                elif arg.name in anchor_params:
                    role = "param"
                else:
                    role = "input"
                block.inputs.append(BlockInput(arg.name, owner.get(arg.name), role))
            node = traced.nodes[name]
            if any(u.name not in members for u in node.users):
                block.outputs.append(name)
        block.params = [traced.params[i.name] for i in block.inputs if i.name in traced.params]
        block.flops = sum(traced.flops.get(n, 0) for n in block.nodes)
        if activation not in seen:  # the anchor's activation is made inside its own block
            raise ValueError(f"anchor {block.anchor} reads an activation from its own block")
