"""Anchor rules: which ops start a ParallelBlock, and how each reads as an einsum.

An *anchor* is an op that contracts an activation with a trainable parameter.
Each anchor op is registered here, keyed by its overload, with the rule that
names its dimensions: one letter per dimension of its activation, of each
parameter it reads and of its output (see ``cfp.configs`` for what sharding a
letter means). This is the one place to add an anchor, in the spirit of
DTensor's ``register_op_strategy``::

    @register_anchor(aten.mm.default)
    def _mm(anchor: Node, traced: TracedModel) -> AnchorLetters: ...

An op with no rule is not an anchor: it joins the block of its producer.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._ops import OpOverload
from torch.fx import Node

from cfp.capture import TracedModel

aten = torch.ops.aten


def is_view(node: Node) -> bool:
    """Whether ``node``'s result is a view of its first argument, as its schema says (``OpOverload.is_view``:
    ``view``, ``t``, ``permute``, ``numpy_T`` for ``weight.T``, ``squeeze``, ...).

    A parameter is only re-viewed through such ops on its way to an anchor.
    A view is not a property of one anchor: any anchor, and the cut itself
    (``blocks.partition``), sees through it to the parameter.
    """
    if node.op != "call_function" or not isinstance(node.target, OpOverload) or not node.args:
        return False
    returns = node.target._schema.returns
    return node.target.is_view and len(returns) == 1 and isinstance(node.meta.get("val"), torch.Tensor)


def param_root(node: Node, traced: TracedModel) -> Node | None:
    """The parameter placeholder a node is a view of, if it is one."""
    while is_view(node) and isinstance(node.args[0], Node):
        node = node.args[0]
    if node.op == "placeholder" and node.name in traced.params:
        return node
    return None


@dataclass(frozen=True)
class AnchorLetters:
    """An anchor read as an einsum: letters per dimension of its activation, parameters and output."""

    activation: str
    params: dict[str, str]  # parameter placeholder name -> letters
    output: str


AnchorRule = Callable[[Node, TracedModel], AnchorLetters]

ANCHOR_RULES: dict[OpOverload, AnchorRule] = {}


def register_anchor(*ops: OpOverload) -> Callable[[AnchorRule], AnchorRule]:
    """Make ``ops`` anchors, read by the decorated rule. An op has one rule."""

    def register(rule: AnchorRule) -> AnchorRule:
        for op in ops:
            if op in ANCHOR_RULES:
                raise ValueError(f"{op} already has an anchor rule ({ANCHOR_RULES[op].__name__})")
            ANCHOR_RULES[op] = rule
        return rule

    return register


def anchor_letters(anchor: Node, traced: TracedModel) -> AnchorLetters:
    """The registered rule's letters for an anchor node."""
    rule = ANCHOR_RULES.get(anchor.target)
    if rule is None:
        raise ValueError(
            f"{anchor.name} ({anchor.target}) has no anchor rule; register one with cfp.anchors.register_anchor"
        )
    return rule(anchor, traced)


# -- the rules -----------------------------------------------------------------

BATCH = string.ascii_lowercase  # letters for leading (batch-like) dimensions


def _shape(node: Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


class NotAnAnchor(ValueError):
    """The op's rule reads a parameter where this node has none (a conv whose weight is computed)."""


def _param(arg: Node, letters: str, traced: TracedModel) -> tuple[str, str]:
    """The parameter ``arg`` is a view of, and the letters of the parameter's own dimensions, given ``letters`` for
    the view's.

    A view lays its dimensions over the parameter's memory: a parameter
    dimension takes the letter of the view dimension with its stride and size
    (``weight.T`` swaps the letters back), or, split into several view
    dimensions, that of the outermost (sharding it shards the parameter
    dimension in contiguous chunks). A dimension no view dimension covers
    alone (merged with another, broadcast) gets a letter no other operand has,
    so it is never sharded.
    """
    root = param_root(arg, traced)
    if root is None:
        raise NotAnAnchor(f"{arg.name} is not a view of a parameter")
    if arg is root:
        return root.name, letters
    view, param = arg.meta["val"], root.meta["val"]
    dims = [(size, stride, letter) for size, stride, letter in zip(view.shape, view.stride(), letters) if size > 1]
    own = iter(UNSHARED)
    root_letters = ""
    for size, stride in zip(param.shape, param.stride()):
        covered, letter = 1, None
        while covered < size:  # walk outward from the view dimension at this one's stride
            inner = next(((s, ltr) for s, st, ltr in dims if st == stride * covered), None)
            if inner is None:
                break
            covered, letter = covered * inner[0], inner[1]
        root_letters += letter if covered == size and letter is not None else next(own)
    return root.name, root_letters


UNSHARED = "".join(chr(c) for c in range(0x3B1, 0x3C9))  # Greek: letters of parameter dimensions no view covers alone


@register_anchor(aten.linear.default)
def _linear(anchor: Node, traced: TracedModel) -> AnchorLetters:
    lead = BATCH[: len(_shape(anchor.args[0])) - 1]
    params = dict([_param(anchor.args[1], "NK", traced)])
    if len(anchor.args) > 2 and anchor.args[2] is not None:
        params.update([_param(anchor.args[2], "N", traced)])
    return AnchorLetters(lead + "K", params, lead + "N")


@register_anchor(aten.addmm.default)
def _addmm(anchor: Node, traced: TracedModel) -> AnchorLetters:
    """bias + activation @ weight, the weight stored [in, out] (Hugging Face's Conv1D)."""
    bias, weight = anchor.args[0], anchor.args[2]
    params = dict([_param(weight, "KN", traced)])
    if param_root(bias, traced) is not None:
        params.update([_param(bias, "N", traced)])
    return AnchorLetters("bK", params, "bN")


@register_anchor(aten.embedding.default)
def _embedding(anchor: Node, traced: TracedModel) -> AnchorLetters:
    lead = BATCH[: len(_shape(anchor.args[1]))]
    return AnchorLetters(lead, dict([_param(anchor.args[0], "VD", traced)]), lead + "D")


@register_anchor(aten.einsum.default)
def _einsum(anchor: Node, traced: TracedModel) -> AnchorLetters:
    lhs, out = anchor.args[0].replace(" ", "").split("->")
    act, params = "", {}
    for letters, arg in zip(lhs.split(","), anchor.args[1]):
        if param_root(arg, traced) is not None:
            params.update([_param(arg, letters, traced)])
        else:
            act = letters
    return AnchorLetters(act, params, out)


@register_anchor(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(anchor: Node, traced: TracedModel) -> AnchorLetters:
    a, b = anchor.args[0], anchor.args[1]
    a_shape, b_shape = _shape(a), _shape(b)
    lead = BATCH[: max(len(a_shape), len(b_shape)) - 2]
    a_letters = lead[len(lead) - (len(a_shape) - 2) :] + "MK"
    b_letters = lead[len(lead) - (len(b_shape) - 2) :] + "KN" if len(b_shape) > 1 else "K"
    if param_root(b, traced) is not None:
        return AnchorLetters(a_letters, dict([_param(b, b_letters, traced)]), lead + "MN")
    return AnchorLetters(b_letters, dict([_param(a, a_letters, traced)]), lead + "MN")


@register_anchor(aten.conv1d.default, aten.conv2d.default, aten.convolution.default)
def _convolution(anchor: Node, traced: TracedModel) -> AnchorLetters:
    """Batch only: every other dimension gets a letter no config shards (``UNSHARED``).

    DTensor runs a convolution through its own handler (``_tp_conv``). Its
    backward redistributes the output's gradient to the input's placements:
    right for a batch-sharded input, but with channels sharded (row or column
    parallel) it hands the local kernel mismatched shards on real data, though
    propagation on meta lets them through. With the width sharded it trades
    halos point to point, out of sight of the collectives analysis records,
    and the ranks' shards of a strided output can differ in size. The bias is
    not sharded.
    """
    ndim = len(_shape(anchor.args[0]))
    # From the end: _param names the dimensions a view merges from the start.
    letters = iter(reversed(UNSHARED))
    channels, out, into = next(letters), next(letters), next(letters)
    spatial = "".join(next(letters) for _ in range(ndim - 2))
    kernel = "".join(next(letters) for _ in range(ndim - 2))
    weight = dict([_param(anchor.args[1], out + into + kernel, traced)])
    return AnchorLetters("B" + channels + spatial, weight, "B" + out + spatial)
