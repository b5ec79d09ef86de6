"""Placements: DTensor's ``Placement`` objects inside CFP, strings only at the JSON boundary.

Everything CFP computes with holds ``Placements``, one DTensor ``Placement``
per mesh dimension. Strings appear only where placements leave the process:
the plan file, the profile store's transition rows and the ``--json`` output
of ``cfp analyze``. ``to_str`` and ``from_str`` are the one conversion, and
they round-trip every placement CFP meets:

- ``"Shard(d)"`` for ``Shard(d)``;
- ``"_StridedShard(d, sf=k)"`` for ``_StridedShard(d, split_factor=k)``, what
  DTensor's view rules make of a sharded dimension that a reshape splits or
  merges;
- ``"Replicate()"`` for ``Replicate()``;
- ``"Partial(op)"`` for ``Partial(op)``. DTensor's own subclasses (the masked
  partial of a vocabulary-sharded embedding, a norm's partial) reduce as
  ``Partial(op)`` and are written as one: ``canonical`` says so, and keys
  compare placements after it.

``short`` is the compact form the terminal shows (``S1,R``). ``local_numel``
and ``replicate_partials`` are the two placement computations several stages
share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from cfp.errors import CFPError

Placements = tuple[Placement, ...]

_STRIDED = re.compile(r"_StridedShard\((\d+), sf=(\d+)\)")


def is_sharded(p: Placement) -> bool:
    """``Shard`` or ``_StridedShard``: each rank holds a slice of dimension ``p.dim``.

    ``_StridedShard.is_shard()`` is False (it is not a ``Shard`` subclass), so
    this is DTensor's own ``_is_shard_like``.
    """
    return isinstance(p, (Shard, _StridedShard))


def canonical(p: Placement) -> Placement:
    """The placement as its string keeps it: a ``Partial`` subclass becomes the plain ``Partial`` it reduces as."""
    if isinstance(p, Partial) and type(p) is not Partial:
        return Partial(p.reduce_op)
    return p


def to_str(p: Placement) -> str:
    """``Shard(dim=0)`` -> ``"Shard(0)"``; the inverse of ``from_str``."""
    if isinstance(p, _StridedShard):
        return f"_StridedShard({p.dim}, sf={p.split_factor})"
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    if isinstance(p, Partial):
        return f"Partial({p.reduce_op})"
    if isinstance(p, Replicate):
        return "Replicate()"
    raise CFPError(f"Placement {p!r} has no string form in a CFP plan.")


def from_str(text: str) -> Placement:
    """``"Shard(0)"``, ``"_StridedShard(0, sf=2)"``, ``"Replicate()"``, ``"Partial(sum)"`` -> the placement."""
    text = text.strip()
    if text.startswith("Shard(") and text.endswith(")"):
        return Shard(int(text[6:-1]))
    strided = _STRIDED.fullmatch(text)
    if strided:
        return _StridedShard(int(strided[1]), split_factor=int(strided[2]))
    if text.startswith("Partial(") and text.endswith(")"):
        return Partial(text[8:-1] or "sum")
    if text == "Replicate()":
        return Replicate()
    raise CFPError(f"Placement {text!r} is not Shard(d), Replicate() or Partial(op).")


def to_strs(placements: Iterable[Placement] | None) -> list[str] | None:
    return None if placements is None else [to_str(p) for p in placements]


def from_strs(texts: Iterable[str] | None) -> Placements | None:
    return None if texts is None else tuple(from_str(t) for t in texts)


def normalize(placements: Iterable[Placement] | None) -> Placements | None:
    """``canonical`` on each: placements as keys and labels compare them."""
    return None if placements is None else tuple(canonical(p) for p in placements)


def short(placements: Iterable[Placement]) -> str:
    """The terminal's compact form: ``(Shard(2), Replicate())`` -> ``"S2,R"``.

    ``Partial(sum)`` is ``P``, another reduce op is named (``Pavg``), and a
    strided shard shows its split factor (``S0/2``).
    """
    out = []
    for p in placements:
        if isinstance(p, _StridedShard):
            out.append(f"S{p.dim}/{p.split_factor}")
        elif isinstance(p, Shard):
            out.append(f"S{p.dim}")
        elif isinstance(p, Partial):
            out.append("P" if p.reduce_op == "sum" else f"P{p.reduce_op}")
        else:
            out.append("R")
    return ",".join(out)


def replicated(ndim: int) -> Placements:
    return (Replicate(),) * ndim


def replicate_partials(placements: Placements) -> Placements:
    """``Partial`` -> ``Replicate``, shards unchanged.

    A value is made, and a gradient placed, from a full tensor that every rank
    holds: a pending sum of it would be counted once per rank.
    """
    return tuple(Replicate() if p.is_partial() else p for p in placements)


def local_numel(shape: Sequence[int], placements: Iterable[Placement] | None, mesh_shape: Sequence[int]) -> int:
    """Elements each rank holds: every sharded dimension divided by its mesh dimension's size (the largest
    shard where sizes do not divide)."""
    dims = list(shape)
    for p, n in zip(placements or (), mesh_shape):
        if is_sharded(p) and p.dim < len(dims):
            dims[p.dim] = math.ceil(dims[p.dim] / n)
    return math.prod(dims)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (no autograd, no dispatch); a plain tensor itself."""
    return t._local_tensor if isinstance(t, DTensor) else t
