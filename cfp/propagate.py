"""Propagation: what each entry config does to a block, read off DTensor.

For one (block, config), the block's ops run with DTensor on ``meta``
tensors over the fake process group, forward and backward, then every
parameter's gradient is reduced to the parameter's placement. The result
records each op's output placements, the exit placements, the placements
each external input takes, every collective (kind, mesh dimension, bytes,
phase) and the per-device memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._guards import active_fake_mode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from cfp.blocks import Block
from cfp.capture import TracedModel
from cfp.configs import BlockConfig
from cfp.placements import Placements, local_tensor, replicate_partials
from cfp.program import Collective, CommRecorder, make_dtensor, run_block


@dataclass
class BlockStrategy:
    """What one config of one block class does, by position in the block."""

    config: BlockConfig
    valid: bool  # the anchor runs without communication
    reason: str = ""  # why not valid
    input_placements: list[Placements | None] = field(default_factory=list)  # aligned with Block.inputs
    node_placements: list[Placements | None] = field(default_factory=list)  # aligned with Block.nodes
    exit_placements: list[Placements | None] = field(default_factory=list)  # aligned with Block.outputs
    collectives: list[Collective] = field(default_factory=list)
    param_bytes: int = 0  # per device
    activation_bytes: int = 0  # per device, every op output of the block (what autograd may save)
    saved_bytes: int = 0  # per device, what autograd does save for backward (parameters left out)
    grad_bytes: int = 0  # per device, the most gradient bytes one op of the block has in flight in backward
    # Which inputs and exits are among the saved tensors, whole (aligned with Block.inputs and Block.outputs): a value
    # that several blocks save is one tensor where no transition copies it between them (``cfp.shared``).
    saved_inputs: list[bool] = field(default_factory=list)
    saved_exits: list[bool] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    @property
    def comm_free(self) -> bool:
        return not any(c.phase == "forward" for c in self.collectives)

    def comm_bytes(self, phase: str | None = None) -> int:
        return sum(c.bytes for c in self.collectives if phase is None or c.phase == phase)


def _describe(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _local_bytes(value) -> int:
    if isinstance(value, DTensor):
        local = value.to_local()
        return local.numel() * local.element_size()
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_local_bytes(v) for v in value)
    return 0


def _saved_bytes(saved: list[torch.Tensor], params: list) -> int:
    """Bytes of the distinct storages autograd saved, parameters (counted as parameters) left out."""

    seen = {local_tensor(p).untyped_storage()._cdata for p in params if isinstance(p, torch.Tensor)}
    total = 0
    for t in saved:
        storage = local_tensor(t).untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def _saved_whole(values: list, saved: list[torch.Tensor]) -> list[bool]:
    """Per value: whether autograd saved its storage, and the storage is the value's alone (not a view's base)."""
    storages = {local_tensor(t).untyped_storage()._cdata for t in saved}
    out = []
    for value in values:
        local = local_tensor(value) if isinstance(value, torch.Tensor) else None
        out.append(
            local is not None
            and local.untyped_storage()._cdata in storages
            and local.untyped_storage().nbytes() == local.numel() * local.element_size()
        )
    return out


class _BackwardTensors(TorchDispatchMode):
    """The local ops backward runs (DTensor desugars each op first): which tensors made in backward each
    reads and makes."""

    def __init__(self, upstream: list[DTensor]):
        super().__init__()
        # storage (_cdata) -> bytes, for the upstream gradients and every op's new outputs
        self.made: dict[int, int] = {}
        self.kept: list[torch.UntypedStorage] = []  # so that no storage's address is reused (meta storages are free)
        self.ops: list[set[int]] = []  # per op, the made storages it reads or makes
        for g in upstream:
            self._add(local_tensor(g).untyped_storage(), _local_bytes(g))  # the shard, not a view's whole base

    def _add(self, storage: torch.UntypedStorage, size: int) -> None:
        self.made.setdefault(storage._cdata, size)
        self.kept.append(storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if active_fake_mode() is not None:  # DTensor's sharding propagation working out an output's shape
            return out
        read = {s._cdata for s in _storages((args, kwargs))}
        made = _storages(out)
        for s in made:
            if s._cdata not in read:  # a new tensor, not a view or an in-place result
                self._add(s, s.nbytes())
        self.ops.append({i for i in read | {s._cdata for s in made} if i in self.made})
        return out

    def most_bytes(self, leaving_out: set[int]) -> int:
        """The most bytes of made tensors one op reads and makes, the storages ``leaving_out`` left out."""
        return max((sum(self.made[i] for i in op if i not in leaving_out) for op in self.ops), default=0)


def _storages(tree) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _placements_of(value) -> Placements | None:
    return tuple(value.placements) if isinstance(value, DTensor) else None


def entry_placements(block: Block, config: BlockConfig) -> dict[str, Placements]:
    """The placements a config fixes: the anchor's activation input and its parameters."""
    activation = next(i.name for i in block.inputs if i.role == "activation")
    return {activation: config.activation, **config.placements()}


def needs_grad(block: Block, name: str, traced: TracedModel) -> bool:
    """Whether a block's external input takes a gradient: a trainable parameter, or a value another
    block made. Buffers (BatchNorm's running statistics), graph inputs and prologue values do not."""
    if name in traced.params:
        return name not in traced.frozen
    return any(i.name == name and i.producer is not None for i in block.inputs)


def propagate(block: Block, config: BlockConfig, traced: TracedModel, mesh: DeviceMesh) -> BlockStrategy:
    """Run one config of one block on meta tensors and record what DTensor does."""
    nodes = [traced.nodes[n] for n in block.nodes]
    entry = entry_placements(block, config)

    def make_input(node, placements):
        val = node.meta["val"]
        meta = torch.empty(val.shape, dtype=val.dtype, device="meta")
        return make_dtensor(meta, mesh, placements, requires_grad=needs_grad(block, node.name, traced))

    result = BlockStrategy(config=config, valid=True)
    forward = CommRecorder(mesh, "forward")
    saved: list[torch.Tensor] = []
    try:
        with forward, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            run = run_block(nodes, mesh, entry, make_input, recorder=forward)
    except Exception as exc:  # DTensor refused this config somewhere inside the block
        return BlockStrategy(config=config, valid=False, reason=_describe(exc))
    if any(c.op == block.anchor for c in forward.collectives):
        return BlockStrategy(config=config, valid=False, reason="the anchor needs communication under this config")
    values = run.values
    result.fallbacks = run.fallbacks
    result.input_placements = [run.input_placements.get(i.name) for i in block.inputs]
    result.node_placements = [_placements_of(values[n]) for n in block.nodes]
    result.exit_placements = [_placements_of(values[n]) for n in block.outputs]
    params = [values[i.name] for i in block.inputs if i.name in traced.params]
    result.param_bytes = sum(_local_bytes(p) for p in params)
    result.activation_bytes = sum(_local_bytes(values[n]) for n in block.nodes)
    result.saved_bytes = _saved_bytes(saved, params)
    result.saved_inputs = _saved_whole([values.get(i.name) for i in block.inputs], saved)
    result.saved_exits = _saved_whole([values[n] for n in block.outputs], saved)
    try:
        backward, result.grad_bytes = _backward(block, values, params, input_values(block, values), mesh)
    except Exception as exc:
        return BlockStrategy(config=config, valid=False, reason="backward: " + _describe(exc))
    result.collectives = forward.collectives + backward
    return result


def exit_gradients(block: Block, values: dict, mesh: DeviceMesh, make_grad=None) -> tuple[list[DTensor], list[DTensor]]:
    """The block's differentiable exits and upstream gradients placed like them.

    ``make_grad(out)`` gives the global gradient tensor of exit ``out``
    (default: an empty ``meta`` tensor, for analysis).
    """
    outs, grads = [], []
    for name in block.outputs:
        out = values[name]
        if isinstance(out, DTensor) and out.requires_grad and out.is_floating_point():
            outs.append(out)
            full = make_grad(out) if make_grad is not None else torch.empty(out.shape, dtype=out.dtype, device="meta")
            grads.append(make_dtensor(full, mesh, replicate_partials(out.placements), requires_grad=False))
    return outs, grads


def input_values(block: Block, values: dict) -> list[DTensor]:
    """The block's differentiable inputs made by other blocks: their gradients flow back to them.

    A block delivers each such gradient placed like the input itself (as
    Megatron's column-parallel input all-reduces its gradient), so the
    producer's backward starts from the placements it was profiled with.
    ``cfp.parallelize`` does the same at every block entry. Parameters,
    buffers and graph inputs (no producer) send no gradient to another block.
    """
    out = []
    for i in block.inputs:
        value = values.get(i.name)
        if i.producer is not None and isinstance(value, DTensor) and value.requires_grad:
            out.append(value)
    return out


def reduce_gradients(params: list[DTensor], mesh: DeviceMesh, recorder: CommRecorder | None = None) -> list:
    """Each tensor's gradient brought to the tensor's own placement (None where it has none)."""
    reduced = []
    for p in params:
        grad = p.grad
        if grad is not None and tuple(grad.placements) != tuple(p.placements):
            if recorder is not None:
                recorder.current_op = "reduce"
            grad = grad.redistribute(mesh, p.placements)
        reduced.append(grad)
    return reduced


def _backward(
    block: Block, values: dict, params: list[DTensor], inputs: list[DTensor], mesh: DeviceMesh
) -> tuple[list[Collective], int]:
    """Backward from gradients placed like the exits (input gradients placed like the inputs), then the
    gradient reduction: its collectives, and the most gradient bytes one op has in flight.

    That is the most one local op reads and makes of the tensors backward made: the upstream gradients
    and those made from them, parameters' gradients left out (counted as gradients). At the loss these sit
    on every saved activation: on GPT-2, log_softmax's two logits-sized gradients (3 GiB of a 15 GiB peak)
    are the step's peak. Counted on the local ops rather than on the block's, the whole gradients of an
    input an op gathers are in (cross-entropy on vocabulary-sharded logits: llama's megatron plan peaked
    6.5% over its prediction without them).
    """
    outs, grads = exit_gradients(block, values, mesh)
    backward = CommRecorder(mesh, "backward")
    tracked = _BackwardTensors(grads)
    with backward, tracked:
        if outs:
            torch.autograd.backward(outs, grads)
            reduce_gradients(inputs, mesh, backward)
    param_grads = {s._cdata for p in params if p.grad is not None for s in _storages(local_tensor(p.grad))}
    reduce = CommRecorder(mesh, "reduce")
    with reduce:
        reduce_gradients(params, mesh, reduce)
    return backward.collectives + reduce.collectives, tracked.most_bytes(param_grads)
