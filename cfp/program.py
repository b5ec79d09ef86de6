"""Running one block's ops with DTensor: the program that analysis propagates
on ``meta`` tensors, that profiling times on real ones and that
``cfp.parallelize`` trains with.

``BlockExecutor`` is the interface: how one op of a block runs on values
placed per the block's config, and the rules its backward keeps.
``DTensorExecutor`` is CFP's executor, and ``run_block`` runs a whole block
on one. External inputs are made lazily, when an op first reads them, so that
an input's placement can follow the op's other operand (a residual stream
takes the placement of the branch it is added to). DTensor's own sharding
rules do the rest, exactly as at training time.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch._ops import OpOverload
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._ops.utils import register_op_strategy, replicate_op_strategy
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.debug._comm_mode import NATIVE_TO_PY_MAPPING, c10d_collective_ops
from torch.distributed.tensor.experimental import implicit_replication
from torch.fx import Node
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from cfp.capture import as_meta, is_buffer
from cfp.placements import Placements, replicate_partials

WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default

COLLECTIVE_KINDS = {
    "all_reduce": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "shard_dim_alltoall": "all_to_all",
    "broadcast": "broadcast",
}


@dataclass(frozen=True)
class Collective:
    """One collective DTensor issued: its kind, mesh dimension and bytes sent in."""

    kind: str
    mesh_dim: int
    bytes: int
    phase: str  # "forward", "backward" or "reduce" (gradient reduction)
    op: str  # the block op that caused it, or "reduce" for a gradient brought to its tensor's placements
    seconds: float = 0.0  # time from issuing it to its result being ready (only when timed)


class CommRecorder(CommDebugMode):
    """CommDebugMode that also keeps each collective's size and mesh dimension.

    With ``sync`` (a device synchronisation) it also times each collective:
    issuing it plus waiting for its result (functional collectives are
    asynchronous: the wait is a separate ``wait_tensor``, charged to the last
    collective issued). On a real process group this is the communication
    time of the phase, waiting for slower ranks included.
    """

    def __init__(self, mesh: DeviceMesh, phase: str, sync=None):
        super().__init__()
        self.sync = sync
        self.groups = {mesh.get_group(d).group_name: d for d in range(mesh.ndim)}
        self.phase = phase
        self.current_op = ""
        self.collectives: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        timed = self.sync is not None and (
            func._overloadpacket in self.comm_registry
            or func._overloadpacket in c10d_collective_ops
            or func is WAIT_TENSOR
        )
        if timed:
            self.sync()
            start = time.perf_counter()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if timed:
            self.sync()
            seconds = time.perf_counter() - start
            if func is WAIT_TENSOR:
                if self.collectives:
                    last = self.collectives[-1]
                    self.collectives[-1] = replace(last, seconds=last.seconds + seconds)
                return out
        if out is NotImplemented or isinstance(func, torch._ops.HigherOrderOperator):
            return out
        packet = func._overloadpacket
        if packet in self.comm_registry or packet in c10d_collective_ops:
            packet = NATIVE_TO_PY_MAPPING.get(packet, packet)
            name = packet.__name__.split(".")[-1]
            tensor = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
            group = next((a for a in reversed(args) if isinstance(a, str)), None)
            self.collectives.append(
                Collective(
                    kind=COLLECTIVE_KINDS.get(name, name),
                    mesh_dim=self.groups.get(group, -1),
                    bytes=tensor.numel() * tensor.element_size(),
                    phase=self.phase,
                    op=self.current_op,
                    seconds=seconds if timed else 0.0,
                )
            )
        return out


def follow_placements(shape: tuple[int, ...], ref: DTensor) -> Placements:
    """The placements an input of ``shape`` takes when combined with ``ref``.

    Shards carry over to the input's dimension that broadcasting aligns with
    the sharded one; everything else (and any ``Partial``) is replicated.
    """
    out = []
    offset = ref.ndim - len(shape)
    for p in ref.placements:
        if isinstance(p, Shard):
            dim = p.dim - offset
            if 0 <= dim < len(shape) and shape[dim] == ref.shape[p.dim]:
                out.append(Shard(dim))
                continue
        out.append(Replicate())
    return tuple(out)


@dataclass
class BlockRun:
    """What one execution of a block produced."""

    values: dict[str, object]  # node/input name -> DTensor (or other value)
    input_placements: dict[str, Placements]
    fallbacks: list[str] = field(default_factory=list)  # ops DTensor could not shard, run replicated


MakeInput = Callable[[Node, Placements], torch.Tensor]


class BlockExecutor(Protocol):
    """How a block's ops run under a config: the contract analysis, profiling and training share.

    Forward, ``run_node`` runs one op of a block on its operands as the block
    reads them: the entry values (the anchor's activation and parameters)
    with the config's placements, values of the block as its earlier ops made
    them, other inputs placed as ``run_block`` or ``cfp.parallelize`` says.
    Backward is autograd's, with two rules an executor keeps so that what
    trains is what was profiled:

    - a value a block reads from another block sends its gradient back placed
      like the value (``GradPlacedLikeValue``; ``cfp.propagate.input_values``
      and ``reduce_gradients`` for a block run alone);
    - each parameter's gradient is brought to the parameter's own placements
      (``cfp.propagate.reduce_gradients``, or ``GradPlacedLikeValue`` around
      the parameter where its uses are summed).

    ``DTensorExecutor`` is the one executor. The lowered runtime
    (``cfp.lower``) does not implement another: it traces this one with
    AOTAutograd, so that the rules live in one place. A new executor
    implements ``run_node`` and ``fallbacks`` and is passed to ``run_block``
    (analysis, profiling); ``ParallelModule.interpret`` (training) makes the
    executor of each step.
    """

    fallbacks: list[str]  # ops it could not shard and ran replicated, in the order run

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        """The value of ``node`` from its operands (DTensors, plain tensors, constants)."""
        ...


def run_block(
    nodes: list[Node],
    mesh: DeviceMesh,
    entry: dict[str, Placements],
    make_input: MakeInput,
    recorder: CommRecorder | None = None,
    placements_for: Callable[[Node, Node, dict], Placements] | None = None,
    executor: BlockExecutor | None = None,
) -> BlockRun:
    """Run ``nodes`` in order on DTensors, each op through ``executor`` (a ``DTensorExecutor`` by default).

    ``entry`` gives the placements of the entry values (the anchor's
    activation and parameters); any other external input gets the placements
    of the op that first reads it (``follow_placements``), or those that
    ``placements_for`` returns. ``make_input(node, placements)`` builds the
    DTensor for an external input.
    """
    executor = executor if executor is not None else DTensorExecutor(mesh)
    members = {n.name for n in nodes}
    run = BlockRun(values={}, input_placements={}, fallbacks=executor.fallbacks)
    env = run.values
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.name in env or arg.name in members:
                continue
            if arg.name in entry:
                placements = entry[arg.name]
            elif placements_for is not None:
                placements = placements_for(arg, node, env)
            else:
                placements = _placements_from_op(arg, node, env, mesh)
            run.input_placements[arg.name] = placements
            env[arg.name] = make_input(arg, placements)
        if recorder is not None:
            recorder.current_op = node.name
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n.name])
        env[node.name] = executor.run_node(node, args, kwargs)
    return run


def _placements_from_op(arg: Node, node: Node, env: dict, mesh: DeviceMesh) -> Placements:
    shape = tuple(arg.meta["val"].shape) if isinstance(arg.meta.get("val"), torch.Tensor) else ()
    refs = [env[a.name] for a in node.all_input_nodes if isinstance(env.get(a.name), DTensor)]
    if refs and shape:
        return follow_placements(shape, max(refs, key=lambda t: t.ndim))
    return (Replicate(),) * mesh.ndim


# Sums where DTensor, given a Partial and a non-Partial operand, would make the
# other operand Partial too and leave the result unreduced.
SUMS = {torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor}


def _reduce_partial_sums(node: Node, args: tuple, mesh: DeviceMesh) -> tuple:
    """Reduce a Partial operand of a sum with a non-Partial one first, as Megatron does.

    DTensor's own choice keeps the sum Partial; for a residual stream that is
    then normalised (which needs it whole) and also carried to the next
    residual, the same tensor would be all-reduced twice.
    """
    if node.target not in SUMS:
        return args
    tensors = [a for a in args if isinstance(a, DTensor)]
    partial = [any(isinstance(p, Partial) for p in t.placements) for t in tensors]
    if len(tensors) < 2 or all(partial) or not any(partial):
        return args

    def whole(a):
        return a.redistribute(mesh, replicate_partials(a.placements)) if isinstance(a, DTensor) else a

    return tuple(whole(a) for a in args)


def _replicate_backward_ops_without_rules() -> None:
    """Backward ops DTensor has no sharding rule for (``hardtanh_backward``, ReLU6's; ``elu_backward``,
    ``softplus_backward``, ...) run replicated, as forward ops without one do (``DTensorExecutor``).

    Autograd dispatches them to DTensor itself, past the executor, so they get DTensor's own fallback
    rule, ``replicate_op_strategy``, registered once per process for exactly those ops. Without it, a
    block with such an op has no config DTensor can run (MobileNetV2's ReLU6).
    """
    propagator = DTensor._op_dispatcher.sharding_propagator
    registries = ("op_strategy_funcs", "op_single_dim_strategy_funcs", "op_to_rules")  # by torch version
    known = {op for registry in registries for op in getattr(propagator, registry, {})}
    for name in dir(torch.ops.aten):
        if not name.endswith("_backward"):
            continue
        packet = getattr(torch.ops.aten, name)
        for overload in packet.overloads():
            op = getattr(packet, overload)
            schema = op._schema
            if op in known or op.is_view or any(a.is_out for a in schema.arguments):
                continue
            if all(str(r.type) == "Tensor" for r in schema.returns):  # the fallback's outputs: tensors
                register_op_strategy(op)(replicate_op_strategy)


_replicate_backward_ops_without_rules()


# Losses whose mean counts only the targets that are not ignore_index.
MEAN_LOSSES = {torch.ops.aten.cross_entropy_loss.default, torch.ops.aten.nll_loss.default}
MEAN = 1  # torch's Reduction.MEAN


def _loss_args(node: Node, args, kwargs) -> dict:
    names = [a.name for a in node.target._schema.arguments]
    bound = {a.name: a.default_value for a in node.target._schema.arguments}  # in schema order
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _sharded_mean_loss(node: Node, args, kwargs) -> bool:
    bound = _loss_args(node, args, kwargs)
    tensors = (bound["self"], bound["target"])  # a Partial one may be reduce-scattered into shards
    split = any(isinstance(t, DTensor) and not all(p.is_replicate() for p in t.placements) for t in tensors)
    return split and bound["reduction"] == MEAN and bound["weight"] is None


def _mean_loss_over_shards(node: Node, args, kwargs, mesh: DeviceMesh):
    """A mean loss over split scores or targets, as the sum over shards divided by the count of targets.

    DTensor averages the shards' means (``Partial(avg)``), which is the mean only when every
    shard counts as many targets; ``ignore_index`` (padding, the shifted labels' last position)
    breaks that. The sum and the count are both exact.
    """
    bound = _loss_args(node, args, kwargs)
    replicate = (Replicate(),) * mesh.ndim

    def whole(t):
        return t.redistribute(mesh, replicate) if isinstance(t, DTensor) else DTensor.from_local(t, mesh, replicate)

    with implicit_replication():
        total = node.target(*({**bound, "reduction": 2}.values()))  # Reduction.SUM: Partial(sum)
        count = (bound["target"] != bound["ignore_index"]).sum()
    return whole(total) / whole(count).to(total.dtype)


class DTensorExecutor:
    """CFP's block executor: each op through DTensor's own sharding propagation, with CFP's rules.

    - export's ``_assert`` ops (checks of the single-device trace) are skipped;
    - a ``Partial`` operand of a sum with a non-``Partial`` one is reduced
      first, as Megatron does (``_reduce_partial_sums``);
    - a mean loss over split scores or targets is the sum over shards divided
      by the count of targets (``_mean_loss_over_shards``);
    - a ``view`` that a shard's strides forbid runs as ``reshape``, and an op
      that views inside (``matmul``) on contiguous inputs;
    - an argument an op updates in place (batch norm's running statistics)
      keeps the update where DTensor would run the op on a redistributed copy
      of it (``KeepInPlaceUpdates``);
    - an op DTensor has no rule for runs replicated on whole tensors, and is
      named in ``fallbacks``.
    """

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh
        self.fallbacks: list[str] = []

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        mesh = self.mesh
        if node.target is operator.getitem:
            return operator.getitem(*args)
        if str(node.target).startswith("aten._assert"):
            return None  # export's metadata checks of the single-device trace, not computation
        args = _reduce_partial_sums(node, args, mesh)
        if node.target in MEAN_LOSSES and _sharded_mean_loss(node, args, kwargs):
            return _mean_loss_over_shards(node, args, kwargs, mesh)
        try:
            # A plain tensor meeting a DTensor (a lifted constant, a factory op's output) is the
            # same on every rank: DTensor takes it as Replicate.
            state = _state_read(node, args) if may_update_arguments(node.target) else []
            updates = KeepInPlaceUpdates(state) if state else contextlib.nullcontext()
            with implicit_replication(), _attention_kernels(node, args), updates:
                return node.target(*args, **kwargs)
        except Exception as exc:
            if _strides_forbid_view(exc):
                # A local shard's strides can forbid a view the whole tensor allows (a transposed value
                # split on another dim): reshape computes the same values, copying where it must; an op
                # that views inside (matmul folding its batch dims) runs on contiguous inputs.
                with implicit_replication():
                    if node.target is torch.ops.aten.view.default:
                        return torch.ops.aten.reshape.default(*args, **kwargs)
                    return node.target(*_contiguous(args), **kwargs)
            no_rule = isinstance(exc, NotImplementedError) and (
                "sharding strateg" in str(exc) or "sharding propagation" in str(exc)
            )
            if not no_rule and not (_on_meta(args, kwargs) and fake_kernel_fails(node)):
                raise
        # DTensor has no rule for this op, or its fake kernel fails: run it replicated, which is always correct.
        self.fallbacks.append(str(node.target))
        return _call_replicated(node, args, kwargs, mesh)


def may_update_arguments(op) -> bool:
    """Whether an op, or an op it decomposes into before DTensor sees it, may update an argument in place:
    its schema says so, or it is a composite (``aten.batch_norm`` declares no update and decomposes into
    ``native_batch_norm``, which updates the running statistics though its schema does not say so)."""
    if not isinstance(op, OpOverload):
        return False
    if any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments):
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


def _state_read(node: Node, args: tuple) -> list[DTensor]:
    """The model's buffers an op reads, as DTensors: what an op that may update arguments could update."""
    return [value for arg, value in zip(node.args, args) if is_buffer(arg) and isinstance(value, DTensor)]


class KeepInPlaceUpdates(TorchDispatchMode):
    """An op that updates state DTensor redistributes for it updates the state, not a copy.

    DTensor redistributes an argument an op updates in place like any other: batch norm on a
    channel-sharded input (DTensor's pick for a batch-sharded one once the all-to-all is cheaper than
    gathering the input) updates a channel-sharded copy of the replicated running statistics, and the
    module's statistics stay as they were. Here each of ``state`` is redistributed first, as DTensor's
    propagation asks, and copied back after the op. Always copied back: schemas do not always say
    what an op updates (``native_batch_norm``'s does not), version counters do not move either, and a
    traced step cannot compare values. A dispatch mode, because the update can come from an op that
    the graph's op decomposes into.
    """

    def __init__(self, state: list[DTensor]):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = [i for i, a in enumerate(args) if any(a is s for s in self.state)]
        if not state:
            return func(*args, **kwargs)
        dispatcher = DTensor._op_dispatcher
        info = dispatcher.unwrap_to_op_info(func, args, kwargs)
        dispatcher.sharding_propagator.propagate(info)
        sharding = info.output_sharding
        wanted = sharding.redistribute_schema.args_schema if sharding.needs_redistribute else ()
        moved = [
            i
            for i in state
            if i < len(wanted)
            and isinstance(wanted[i], DTensorSpec)
            and tuple(wanted[i].placements) != tuple(args[i].placements)
        ]
        placed = list(args)
        for i in moved:
            placed[i] = args[i].redistribute(args[i].device_mesh, wanted[i].placements)
        out = func(*placed, **kwargs)
        for i in moved:
            args[i].copy_(placed[i].redistribute(args[i].device_mesh, args[i].placements))
        return out


def _strides_forbid_view(exc: Exception) -> bool:
    # RuntimeError on real tensors; ValueError from the fake kernel AOTAutograd traces with.
    return "view size is not compatible" in str(exc) or "Cannot view a tensor with shape" in str(exc)


def _contiguous(args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


class GradPlacedLikeValue(torch.autograd.Function):
    """Identity whose backward brings the gradient to the value's placements, as every block
    program delivers its input gradients (``cfp.propagate.input_values``), and contiguous, as
    block programs receive the gradients of their exits (a shard of a transposed gradient
    may not allow the views the producer's backward takes).

    The backward rule of ``BlockExecutor``: ``cfp.parallelize`` applies it where a value enters
    a block, and the lowered programs (``cfp.lower``, ``BlockProgram._lower``) to every
    parameter, so that the reduction is traced into their backward program."""

    @staticmethod
    def forward(ctx, value):
        ctx.mesh, ctx.placements = value.device_mesh, tuple(value.placements)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, DTensor) and tuple(grad.placements) != ctx.placements:
            grad = grad.redistribute(ctx.mesh, ctx.placements)
        return grad.contiguous()


def _attention_kernels(node: Node, args):
    """SDPA off CUDA runs its math decomposition (matmuls and a softmax, which DTensor shards
    over batch and heads): DTensor has no rule for the fused CPU kernel's backward."""
    on_cuda = any(isinstance(a, DTensor) and a.device.type == "cuda" for a in args)
    if node.target is torch.ops.aten.scaled_dot_product_attention.default and not on_cuda:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _on_meta(args, kwargs) -> bool:
    tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors)


def fake_kernel_fails(node: Node) -> bool:
    """Whether the op raises on shape-only tensors of the shapes export recorded: on ``meta``
    ones, or on the fake CPU ones DTensor's sharding propagation uses (``histc`` on integers)."""
    if "cfp_fake_kernel_fails" not in node.meta:
        node.meta["cfp_fake_kernel_fails"] = not _runs(node, lambda v: as_meta(v))
        if not node.meta["cfp_fake_kernel_fails"]:
            with FakeTensorMode() as fake:

                def cpu(v):
                    if isinstance(v, torch.Tensor):
                        return fake.from_tensor(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype))
                    return v

                node.meta["cfp_fake_kernel_fails"] = not _runs(node, cpu)
    return node.meta["cfp_fake_kernel_fails"]


def _runs(node: Node, make) -> bool:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: make(n.meta.get("val")))
    try:
        node.target(*args, **kwargs)
    except Exception:
        return False
    return True


def _call_replicated(node: Node, args, kwargs, mesh: DeviceMesh):
    """The op on whole local tensors, its outputs as replicated DTensors.

    On ``meta`` tensors an op whose meta kernel fails (``histc`` on integers)
    takes the output shapes export recorded in ``node.meta["val"]``.
    """
    replicate = (Replicate(),) * mesh.ndim

    def to_local(a):
        return a.redistribute(mesh, replicate).to_local() if isinstance(a, DTensor) else a

    state = _state_read(node, args) if may_update_arguments(node.target) else []
    local_args, kwargs = torch.utils._pytree.tree_map(to_local, (args, kwargs))
    gathered = [(a, local) for a, local in zip(args, local_args) if any(a is s for s in state)]
    if _on_meta(local_args, kwargs) and not _runs(node, as_meta):
        out = as_meta(node.meta["val"])
    else:
        out = node.target(*local_args, **kwargs)

    def wrap(t):
        return DTensor.from_local(t, mesh, replicate, run_check=False) if isinstance(t, torch.Tensor) else t

    # State the op may have updated in place was updated on its gathered copy: bring it back.
    for original, local in gathered:
        if tuple(original.placements) != replicate:
            original.copy_(wrap(local).redistribute(mesh, original.placements))
    return torch.utils._pytree.tree_map(wrap, out)


def make_dtensor(global_tensor: torch.Tensor, mesh: DeviceMesh, placements: Placements, requires_grad: bool) -> DTensor:
    """Each rank keeps its own shard of the same global tensor (no scatter)."""
    dt = distribute_tensor(global_tensor, mesh, replicate_partials(placements), src_data_rank=None)
    return dt.requires_grad_(requires_grad and dt.is_floating_point())
