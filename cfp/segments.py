"""Segments: block classes and the repeated runs of them.

Two blocks are of one *class* when their subgraphs are the same: same ops in
the same order, same shapes and dtypes, same parameter shapes. The class id is
networkx's Weisfeiler-Lehman hash of the block's dataflow graph labelled with
those; blocks of one class are profiled once. Maximal repeated runs of
classes (the layers of a transformer) are *segments*.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import networkx as nx
import torch

from cfp.blocks import Block
from cfp.capture import TracedModel, op_name


def _label(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{op_name(node) if node.op == 'call_function' else node.op}:{tuple(val.shape)}:{val.dtype}"
    if isinstance(val, (tuple, list)):
        return f"{op_name(node)}:" + ",".join(str(tuple(v.shape)) for v in val if isinstance(v, torch.Tensor))
    return op_name(node) if node.op == "call_function" else node.op


def _value_label(node: torch.fx.Node) -> str:
    """An external input is known by its shape and dtype, not by the op that made it:
    the first layer reads the residual stream from an embedding, the others from an add."""
    val = node.meta.get("val")
    return f"{tuple(val.shape)}:{val.dtype}" if isinstance(val, torch.Tensor) else node.op


def block_digraph(block: Block, traced: TracedModel) -> nx.DiGraph:
    """The block's dataflow: its ops and the external values they read."""
    g = nx.DiGraph()
    members = set(block.nodes)
    for name in block.nodes:
        node = traced.nodes[name]
        args = [repr(a) for a in node.args if not isinstance(a, (torch.fx.Node, list, tuple))]
        exit_mark = "|exit" if name in block.outputs else ""
        g.add_node(name, label=_label(node) + "|" + ",".join(args) + exit_mark)
        for pos, arg in enumerate(node.all_input_nodes):
            if arg.name not in members:
                role = next(i.role for i in block.inputs if i.name == arg.name)
                g.add_node(arg.name, label=f"in:{role}:" + _value_label(arg))
            g.add_edge(arg.name, name, label=str(pos))
    return g


def structure_key(block: Block, traced: TracedModel) -> tuple:
    """The block exactly: its inputs (role, shape, dtype), then its ops in order,
    each with its label and its arguments, other values named by position, then
    which of its values leave it.

    Blocks with equal keys correspond position by position, which is what lets
    one representative's propagation and profiles stand for the whole class.
    """
    refs = {i.name: f"in{k}" for k, i in enumerate(block.inputs)}
    refs.update({name: f"op{k}" for k, name in enumerate(block.nodes)})
    key = [tuple(f"{i.role}:{_value_label(traced.nodes[i.name])}" for i in block.inputs)]
    for name in block.nodes:
        node = traced.nodes[name]
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: refs[n.name])
        key.append((_label(node), repr(args)))
    key.append(tuple(refs[name] for name in block.outputs))  # which values leave the block
    return tuple(key)


def classify(blocks: list[Block], traced: TracedModel) -> dict[str, list[int]]:
    """Group blocks into structural classes: class id -> block ids, in block order."""
    classes: dict[str, list[int]] = {}
    keys: dict[str, tuple] = {}
    for block in blocks:
        with warnings.catch_warnings():  # networkx notes that directed hashes changed in 3.5
            warnings.simplefilter("ignore", UserWarning)
            wl = nx.weisfeiler_lehman_graph_hash(
                block_digraph(block, traced), node_attr="label", edge_attr="label", iterations=3
            )
        key = structure_key(block, traced)
        class_id, n = wl[:12], 0
        while class_id in keys and keys[class_id] != key:  # a WL collision: keep the classes apart
            n += 1
            class_id = f"{wl[:12]}.{n}"
        keys[class_id] = key
        classes.setdefault(class_id, []).append(block.id)
    return classes


@dataclass(frozen=True)
class Segment:
    """``repeats`` back-to-back copies of the class sequence ``classes``, from block ``start``."""

    classes: tuple[str, ...]
    start: int
    repeats: int

    @property
    def end(self) -> int:
        return self.start + len(self.classes) * self.repeats


def find_segments(class_ids: list[str]) -> list[Segment]:
    """Greedy maximal tandem repeats: at each position take the run that covers most blocks."""
    segments, i, n = [], 0, len(class_ids)
    while i < n:
        best = None
        for period in range(1, (n - i) // 2 + 1):
            unit = class_ids[i : i + period]
            repeats = 1
            while class_ids[i + repeats * period : i + (repeats + 1) * period] == unit:
                repeats += 1
            if repeats > 1 and (best is None or repeats * period > best.repeats * len(best.classes)):
                best = Segment(tuple(unit), i, repeats)
        if best is None:
            i += 1
        else:
            segments.append(best)
            i = best.end
    return segments
