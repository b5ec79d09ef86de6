"""Entry configs: the candidate placements at a block's anchor.

Every anchor is described einsum-style, by its rule in ``cfp.anchors``: one
letter per dimension of its activation input, its parameter(s) and its
output. Sharding one letter on a mesh dimension shards every operand that has
it, which is communication-free for the contraction:

- a letter of the activation and the output only: batch/sequence parallel,
- of the parameter and the output only: column parallel,
- of activation and parameter but not the output: row parallel (``Partial``),
- of all three (an expert or batch-matmul dimension): expert parallel.

A letter of the parameter only (an embedding's vocabulary) would be
vocabulary parallel. It is not offered (``candidates`` leaves such letters
out): DTensor's masked-partial embedding output cannot be reliably
propagated on meta tensors (whether it works depends on DTensor's cache
state), so analysis results would not be deterministic.

A config picks one letter (or none: replicate) per mesh dimension; it is kept
only where DTensor then runs the anchor without communication.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch.distributed.tensor import Placement, Replicate, Shard

from cfp.anchors import UNSHARED, anchor_letters
from cfp.blocks import Block
from cfp.capture import TracedModel


@dataclass(frozen=True)
class AnchorSignature:
    """Letters per dimension of the anchor's activation, parameters and output."""

    activation: str
    params: dict[str, str]  # parameter placeholder name -> letters
    output: str
    sizes: dict[str, int]  # letter -> size

    def role(self, letter: str) -> str:
        in_act = letter in self.activation
        in_param = any(letter in p for p in self.params.values())
        in_out = letter in self.output
        if in_act and in_param:
            return "expert" if in_out else "row"
        if in_param:
            return "col"  # a letter of the parameter only is never a candidate
        dim, ndim = self.activation.index(letter), len(self.activation)
        if dim == 0 and ndim >= 2:
            return "batch"
        if dim == 1 and ndim >= 3:
            return "seq"
        return f"act{dim}"


@dataclass(frozen=True)
class BlockConfig:
    """One choice of placements at a block's entry."""

    name: str  # e.g. "batch" on a 1-D mesh, "batch/col" on a 2-D one
    activation: tuple[Placement, ...]
    # (param placeholder, placements), named as in the class's representative
    # block; for any block of the class read ``BlockStrategy.input_placements``,
    # which is aligned by position with that block's ``inputs``.
    params: tuple[tuple[str, tuple[Placement, ...]], ...]

    def placements(self) -> dict[str, tuple[Placement, ...]]:
        return dict(self.params)


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def signature(block: Block, traced: TracedModel) -> AnchorSignature:
    """Describe the block's anchor as an einsum over letters, by its registered rule (``cfp.anchors``)."""
    anchor = traced.nodes[block.anchor]
    letters = anchor_letters(anchor, traced)
    act_input = next(i for i in block.inputs if i.role == "activation")
    sizes: dict[str, int] = {}
    operands = [(letters.activation, act_input.name)] + [(p_letters, p) for p, p_letters in letters.params.items()]
    for operand_letters, node_name in operands:
        for letter, size in zip(operand_letters, _shape(traced.nodes[node_name])):
            sizes[letter] = size
    for letter, size in zip(letters.output, _shape(anchor)):
        sizes.setdefault(letter, size)
    return AnchorSignature(letters.activation, letters.params, letters.output, sizes)


def candidates(block: Block, traced: TracedModel, mesh_shape: tuple[int, ...]) -> list[BlockConfig]:
    """Every letter-per-mesh-dimension choice whose sharded sizes divide evenly.

    Whether DTensor runs the anchor without communication is checked later, by
    propagation (``cfp.propagate``), which drops the configs that need any.
    """
    sig = signature(block, traced)
    shardable = set(sig.activation) | (set("".join(sig.params.values())) & set(sig.output + sig.activation))
    shardable -= set(UNSHARED)  # letters a rule gives dimensions that must stay whole
    letters = [None] + sorted(shardable)
    configs = []
    per_dim = [letters if size > 1 else [None] for size in mesh_shape]
    for choice in itertools.product(*per_dim):
        split: dict[str, int] = {}
        for letter, size in zip(choice, mesh_shape):
            if letter is not None:
                split[letter] = split.get(letter, 1) * size
        if any(sig.sizes[letter] % s for letter, s in split.items()):
            continue
        name = "/".join("rep" if letter is None else sig.role(letter) for letter in choice)
        activation = _placements(sig.activation, choice)
        params = tuple((p, _placements(param_letters, choice)) for p, param_letters in sig.params.items())
        configs.append(BlockConfig(name, activation, params))
    return configs


def _placements(letters: str, choice: tuple[str | None, ...]) -> tuple[Placement, ...]:
    return tuple(
        Shard(letters.index(letter)) if letter is not None and letter in letters else Replicate() for letter in choice
    )
