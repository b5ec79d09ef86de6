"""Running stored-sharded parameters and recomputed blocks (what ``cfp.parallelize`` uses).

- ``gather``: a parameter stored with its storage placements, brought to the
  placements its block computes with. For ZeRO-2/3 this is DTensor's own
  ``redistribute``, whose backward brings the ``Partial`` gradient to the
  ``Shard`` storage: a reduce-scatter. For ZeRO-1 the gradient is all-reduced
  in full first, as data parallelism does, and each rank keeps its slice.
- ``Regather``: ZeRO-3 keeps no gathered parameter for backward. While the
  forward runs, autograd's saved tensors pass through its hooks; one that
  shares storage with a live gathered parameter is saved as a ``_Token``
  (the stored shard and the view's geometry) and gathered again when
  backward needs it, as FSDP's reshard-after-forward does.
- ``schedule``: the exported graph's ops in order, as steps: one op, or one
  contiguous run of a recomputed block's ops (a checkpoint region), each with
  the values freed after it, as ``torch.fx.Interpreter`` frees them.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor


class _GatherAllReduce(torch.autograd.Function):
    """ZeRO-1: gather the shard; backward all-reduces the full gradient, then keeps this rank's slice."""

    @staticmethod
    def forward(ctx, stored: DTensor, mesh, compute):
        ctx.mesh, ctx.compute, ctx.storage = mesh, tuple(compute), tuple(stored.placements)
        return stored.redistribute(mesh, compute)

    @staticmethod
    def backward(ctx, grad: DTensor):
        full = grad.redistribute(ctx.mesh, ctx.compute)  # Partial -> Replicate: all-reduce
        return full.redistribute(ctx.mesh, ctx.storage), None, None


def gather(stored: DTensor, mesh, compute, level: str) -> DTensor:
    """The stored parameter at its compute placements, differentiably (see the module doc)."""
    if level == "zero1":
        return _GatherAllReduce.apply(stored, mesh, tuple(compute))
    return stored.redistribute(mesh, tuple(compute))


@dataclass(frozen=True)
class _Token:
    """A saved view of a gathered ZeRO-3 parameter: enough to gather it again in backward."""

    stored: DTensor
    compute: tuple
    placements: tuple
    shape: torch.Size
    stride: tuple
    local_size: torch.Size
    local_stride: tuple
    local_offset: int


class Regather:
    """Saved-tensor hooks that keep a ZeRO-3 parameter's gathered copy out of autograd's saved state."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._live: dict[int, tuple] = {}  # storage address -> (weakref to the gathered local tensor, shard, compute)
        self._active = False  # whether ``hooks()`` is on; outside it (a lowered trace regathers itself) none registers

    def register(self, gathered: DTensor, stored: DTensor, compute) -> None:
        if not self._active:
            return
        local = gathered._local_tensor
        # The weak reference proves the address is still this tensor's: storage is not reused while it lives.
        self._live[local.untyped_storage().data_ptr()] = (weakref.ref(local), stored, tuple(compute))

    def clear(self) -> None:
        self._live.clear()

    @contextlib.contextmanager
    def hooks(self):
        self._active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._active = False

    def _pack(self, t):
        if not self._live or not isinstance(t, DTensor):
            return t
        local = t._local_tensor
        entry = self._live.get(local.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None:
            return t
        _, stored, compute = entry
        return _Token(
            stored,
            compute,
            tuple(t.placements),
            t.shape,
            t.stride(),
            local.size(),
            local.stride(),
            local.storage_offset(),
        )

    def _unpack(self, saved):
        if not isinstance(saved, _Token):
            return saved
        with torch.no_grad():
            full = saved.stored.redistribute(self.mesh, saved.compute).to_local()
        local = full.as_strided(saved.local_size, saved.local_stride, saved.local_offset)
        return DTensor.from_local(
            local, self.mesh, saved.placements, run_check=False, shape=saved.shape, stride=saved.stride
        )


# --------------------------------------------------------------------------
# The order ops run in, and when values die
# --------------------------------------------------------------------------


@dataclass
class Step:
    nodes: list  # fx nodes, in graph order
    recompute: bool = False  # a checkpoint region of one recomputed block
    block: int | None = None  # that block
    inputs: list[str] = field(default_factory=list)  # a region's values from outside it
    outputs: list[str] = field(default_factory=list)  # a region's values read after it
    free: list[str] = field(default_factory=list)  # values no later step reads
    blocks_done: set[int] = field(default_factory=set)  # blocks whose last op ran in this step


@dataclass
class Schedule:
    placeholders: list
    steps: list[Step]
    output: object  # the output node's argument


def schedule(graph: torch.fx.Graph, owner: dict[str, int], recompute: set[int]) -> Schedule:
    """Steps over ``graph``: single ops, and contiguous runs of a recomputed block's ops as one region."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    steps: list[Step] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        block = owner.get(node.name)
        region = block is not None and block in recompute
        if region and steps and steps[-1].recompute and owner.get(steps[-1].nodes[-1].name) == block:
            steps[-1].nodes.append(node)
        else:
            steps.append(Step([node], recompute=region, block=block if region else None))
    step_of = {n.name: i for i, step in enumerate(steps) for n in step.nodes}
    last_use: dict[str, int] = {n.name: -1 for n in placeholders}
    last_node: dict[int, int] = {}
    for i, step in enumerate(steps):
        inside = {n.name for n in step.nodes}
        for node in step.nodes:
            last_use.setdefault(node.name, i)
            if owner.get(node.name) is not None:
                last_node[owner[node.name]] = i
            for arg in node.all_input_nodes:
                last_use[arg.name] = i
                if step.recompute and arg.name not in inside and arg.name not in step.inputs:
                    step.inputs.append(arg.name)
        if step.recompute:
            step.outputs = [
                n.name for n in step.nodes if any(u.op == "output" or step_of.get(u.name) != i for u in n.users)
            ]
    kept = {n.name for n in output.all_input_nodes}
    for name, i in last_use.items():
        if i >= 0 and name not in kept:
            steps[i].free.append(name)
    for block, i in last_node.items():
        steps[i].blocks_done.add(block)
    return Schedule(placeholders, steps, output.args[0])
