"""Lowering a parallel module's step to local programs.

``ParallelModule.interpret`` runs the exported graph on DTensors: every op of
every step goes through DTensor's sharding propagation in Python. Lowering
traces that interpreter once with AOTAutograd, which flattens each DTensor
into its local tensor and desugars every redistribution into
``_c10d_functional`` collectives, and splits the joint graph into a forward
and a backward program of plain aten ops on local shards. Each step then runs
those two programs; no DTensor op is dispatched inside them.

DTensor stays the interface: the parameters are DTensor ``nn.Parameter``s
with the plan's placements, AOTAutograd's runtime wrappers unwrap them on the
way in and wrap each parameter's gradient (a local tensor in the backward
program) back into a DTensor with the placements traced for it. Those are the
parameter's own placements, because the traced function passes every
parameter through ``GradPlacedLikeValue`` before its first use: its backward
redistributes the summed gradient of all of the parameter's uses to the
parameter's placements (data parallelism's all-reduce, for a replicated
weight on batch-sharded data), which the trace turns into a collective
inside the backward program, where the gradient is complete.

What backward recomputes rather than saves is the partitioner's to decide,
so the plan's memory choices are told to it (``recomputing_partition``): a
recomputed block's ops, traced once inside ``recompute_region``, and each
ZeRO-3 parameter's gather, traced inside ``stored_gather`` (with the views of it
its block takes), are tagged
``MUST_RECOMPUTE``. AOTAutograd's default partitioner then saves their
inputs and runs them again in the backward program, which is what
``torch.utils.checkpoint`` and ``cfp.sharded.Regather`` do on the
interpreter. (Checkpoint itself cannot: under AOTAutograd's trace its
recomputation never reaches the graph, and every activation was saved.)

A program is traced per input signature (shapes, dtypes, DTensor placements)
and grad mode, on the first call that has it. With ``compile`` the two
programs are compiled by inductor instead of run as traced.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx.traceback as fx_traceback
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import _disable_current_modes

from cfp.buckets import BUCKET_MB
from cfp.errors import CFPError, CFPWarning

if TYPE_CHECKING:
    from cfp.parallelize import ParallelModule


@contextlib.contextmanager
def strided_shards_traceable():
    """``_StridedShard`` values traced by AOTAutograd: offsets computed eagerly, specs rebuilt.

    Redistributing a ``_StridedShard`` (what DTensor's view rules make of a
    reshape of a sharded dimension) computes the offsets of a rank's rows
    from an ``arange`` and ``.tolist()``; under AOTAutograd's fake mode that
    is a data-dependent output and tracing fails. The inputs are sizes, so the
    offsets are computed on real tensors with every dispatch mode off.

    And AOTAutograd rebuilds a ``_StridedShard`` value (a block's exit, its
    tangent) from its flattened spec, whose shard order DTensor's own
    unflattening then refuses beside strided placements; the order is left to
    the placements, which encode it.
    """
    original = _StridedShard.local_shard_size_and_offset

    @functools.wraps(original)
    def eager(self, *args, **kwargs):
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    _StridedShard.local_shard_size_and_offset = eager
    unflatten = DTensor.__tensor_unflatten__
    DTensor.__tensor_unflatten__ = staticmethod(_unflatten_strided(unflatten))
    try:
        yield
    finally:
        _StridedShard.local_shard_size_and_offset = original
        DTensor.__tensor_unflatten__ = staticmethod(unflatten)


def _unflatten_strided(unflatten):
    """``DTensor.__tensor_unflatten__`` without the shard order where ``_StridedShard`` placements give it."""

    @functools.wraps(unflatten)
    def wrapper(inner_tensors, flatten_spec, outer_size, outer_stride):
        placements, meta, shard_order, requires_grad = flatten_spec
        if shard_order is not None and any(isinstance(p, _StridedShard) for p in placements):
            flatten_spec = (placements, meta, None, requires_grad)
        return unflatten(inner_tensors, flatten_spec, outer_size, outer_stride)

    return wrapper


def _signature(value) -> tuple:
    if isinstance(value, DTensor):
        return ("dtensor", tuple(value.shape), value.dtype, tuple(value.placements), value.requires_grad)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    return ("value", value)


def bucket_collectives(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Merge a program's independent all-reduces into one flat collective per bucket, as DDP does, and a block's
    ZeRO all-gathers and reduce-scatters into one each, as FSDP2 does a module's.

    Data parallelism reduces every parameter's gradient; issued one by one,
    each pays the backend's per-call latency (on gpt:small with 2 gloo ranks,
    50 all-reduces waited 79 ms of a 297 ms step, one bucket 22 ms).
    Inductor's bucketing passes concatenate the collectives that do not depend
    on each other (same group, op and dtype), up to ``BUCKET_MB``, and split
    the result back.
    """
    from torch._inductor.fx_passes.bucketing import (
        _ag_group_key,
        _rs_group_key,
        bucket_all_reduce_by_mb,
        greedy_bucket_collective_by_mb,
        is_all_gather_into_tensor,
        is_reduce_scatter_tensor,
        merge_all_gather_bucket,
        merge_all_reduce_bucket,
        merge_reduce_scatter,
    )

    # A recomputed block's collectives stay apart: in backward, bucketed with the gradients' (inductor's pass
    # groups adjacent waits of independent collectives), the recomputation read a result issued after it.
    # So does an all-reduce whose result the program computes with (an activation's gradient reduced
    # mid-backward, under a tensor-parallel block), rather than only return: bucketed, it is issued with the
    # last gradient of its bucket, and inductor's pass moves its readers but not theirs, which then read it
    # before it exists (phi3, a random plan). Left in, one that a later all-reduce depends on also made the
    # pass skip every collective after it (gpt:small, dp with one col block: 65 all-reduces a step instead of
    # one per 25 MB bucket, 184 ms against dp's 99).
    computed_with = _all_reduces_computed_with(gm)

    def bucketable(wait: torch.fx.Node) -> bool:
        return REGION not in wait.args[0].meta.get("custom", {}) and wait.args[0] not in computed_with

    for bucket in bucket_all_reduce_by_mb(gm, lambda bucket: BUCKET_MB, bucketable):
        merge_all_reduce_bucket(gm.graph, bucket)
    # A stored parameter's gradient reduce-scatter carries its gather's annotation: one bucket per block, its
    # wait placed right after it. Other reduce-scatters (of activations) stay apart.
    buckets = greedy_bucket_collective_by_mb(
        gm,
        lambda bucket: BUCKET_MB,
        lambda node: is_reduce_scatter_tensor(node) and _stored_block(node) is not None,
        lambda node: (*_rs_group_key(node), _stored_block(node)),
    )
    if buckets:
        merge_reduce_scatter(gm, buckets)
    wait_reduce_scatters_early(gm)
    # A block's stored parameters are gathered in one all-gather, as FSDP2 gathers a module's, issued where the
    # first of them was (their inputs are the shards the program takes; their readers all come after it).
    for bucket in greedy_bucket_collective_by_mb(
        gm,
        lambda bucket: BUCKET_MB,
        lambda node: is_all_gather_into_tensor(node) and _stored_block(node) is not None,
        lambda node: (*_ag_group_key(node), _stored_block(node)),
    ):
        merge_all_gather_bucket(gm.graph, bucket, insert_before=bucket[0])
    gm.recompile()
    return gm


def _all_reduces_computed_with(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The all-reduces whose result, past its wait and views of it, an op computes with (a parameter's
    gradient is only returned)."""
    from torch._inductor.fx_passes.bucketing import is_all_reduce_tensor

    def computed_with(node: torch.fx.Node) -> bool:
        for user in node.users:
            if user.op == "output":
                continue
            passes_on = user.target is operator.getitem or getattr(user.target, "is_view", False)
            if not passes_on or computed_with(user):
                return True
        return False

    wait_tensor = torch.ops._c10d_functional.wait_tensor.default
    return {
        node
        for node in gm.graph.nodes
        if is_all_reduce_tensor(node) and any(u.target is wait_tensor and computed_with(u) for u in node.users)
    }


def _stored_block(node: torch.fx.Node) -> int | None:
    """The block whose stored parameter this collective gathers (or whose gradient it reduce-scatters)."""
    return node.meta.get("custom", {}).get(GATHER)


def wait_reduce_scatters_early(gm: torch.fx.GraphModule) -> None:
    """Wait for each reduce-scatter right after issuing it, so that its full-size input can be freed.

    A ZeRO-2/3 gradient's reduce-scatter is waited where the program returns
    the shard, at the end of backward, and the collective holds its input
    until then. Bucketed together, as inductor's pass buckets adjacent waits,
    every parameter's full gradient was alive at once (on fsdp gpt:small, 2
    gloo ranks, 47 MiB a rank, where the plan counts 33). Bucketed per block
    and waited at once, one block's full gradients are alive at a time, as
    the memory model counts them. (Moved before bucketing, the early waits
    let inductor's pass bucket reduce-scatters whose results are read before
    the merged collective runs.)
    """
    wait_tensor = torch.ops._c10d_functional.wait_tensor.default
    for node in gm.graph.find_nodes(
        op="call_function", target=torch.ops._c10d_functional.reduce_scatter_tensor.default
    ):
        for user in list(node.users):
            if user.target is wait_tensor:
                node.append(user)


# ops whose output is a new tensor (no alias of an input): an all-reduce may reuse it when nothing else reads it
_FRESH = {
    torch.ops.aten.cat.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
}


def reduce_in_place(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """All-reduce a buffer the program made for it in place, instead of into a copy.

    ``_c10d_functional.all_reduce`` clones its input so that the graph stays
    functional. A bucket's flat buffer (a ``cat`` of its gradients) has no
    other reader, so the clone only costs a second buffer as large, freshly
    allocated and paged in every step: on data-parallel gpt:small, 2 gloo ranks,
    each step copied 13.7 MB for it. Inductor reinplaces collectives itself;
    this is for the programs run as traced.
    """
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops._c10d_functional.all_reduce.default):
        buffer = node.args[0]
        if isinstance(buffer, torch.fx.Node) and buffer.target in _FRESH and len(buffer.users) == 1:
            node.target = torch.ops._c10d_functional.all_reduce_.default
    gm.recompile()
    return gm


# node.meta["custom"] keys: the recomputed region an op was traced in, the block whose stored parameter
# it gathers (its backward, the gradient's reduce-scatter, inherits it), and whether that is a ZeRO-3 gather
REGION = "cfp_recompute_region"
GATHER = "cfp_gather"
REGATHER = "cfp_regather"


@contextlib.contextmanager
def recompute_region(region: int):
    """Ops traced inside are recomputed in backward rather than saved (see ``recomputing_partition``)."""
    with fx_traceback.annotate({REGION: region}):
        yield


@contextlib.contextmanager
def stored_gather(block: int, level: str):
    """The gather of a parameter ``block`` stores sharded at ``level``: its reduce-scatter is bucketed
    with the block's, and a ZeRO-3 one is gathered again in backward rather than saved."""
    with fx_traceback.annotate({GATHER: block, REGATHER: level == "zero3"}):
        yield


def tag_recomputed(graph: torch.fx.Graph) -> None:
    """Tag the joint graph's forward ops that backward must recompute.

    Those are the ops traced in a ``recompute_region`` (each region its own
    ``ac_graph_id``, increasing in graph order, so that a region's output read
    by the next region is saved),
    and a ZeRO-3 parameter's gather with every op that reads nothing else (the
    views its block takes of it). Random ops stay saved, so that recomputing
    them draws no new numbers.
    """
    from torch._functorch.partitioners import _has_tag_is_forward, _is_fwd_seed_offset, _is_primal, _is_tangent
    from torch.utils.checkpoint import CheckpointPolicy

    last = None
    for node in graph.nodes:
        if _has_tag_is_forward(node) or _is_primal(node) or _is_fwd_seed_offset(node):
            last = node
    gathered: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node is last:
            break
        if node.op != "call_function" or _is_tangent(node):
            continue
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        custom = node.meta.get("custom", {})
        inputs = node.all_input_nodes
        if custom.get(REGATHER) or (
            any(i in gathered for i in inputs) and all(i in gathered or i.op == "placeholder" for i in inputs)
        ):
            gathered.add(node)
        elif custom.get(REGION) is None:
            continue
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        if custom.get(REGION) is not None:
            node.meta["ac_graph_id"] = custom[REGION]


def recomputing_partition(joint: torch.fx.GraphModule, joint_inputs, *, num_fwd_outputs: int, **kwargs):
    """AOTAutograd's default partitioner, after ``tag_recomputed``."""
    from torch._functorch.partitioners import default_partition

    tag_recomputed(joint.graph)
    return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)


def aot_options(compile: bool) -> dict[str, Any]:
    """AOTAutograd's compilers: the traced GraphModules themselves, or inductor's (with its decompositions),
    each given the program after the collective passes."""
    options = _compilers(compile)

    def passes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        gm = bucket_collectives(gm)
        return gm if compile else reduce_in_place(gm)

    for kind in ("fw_compiler", "bw_compiler"):
        compiler = options[kind]
        options[kind] = lambda gm, example_inputs, compiler=compiler: compiler(passes(gm), example_inputs)
    return options


def _compilers(compile: bool) -> dict[str, Any]:
    if compile:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.decomposition import select_decomp_table

        def compile_unpadded(gm, example_inputs):
            # Inductor pads the strides of some GPU outputs (a 50257-wide row becomes 50272). Our programs hand
            # their outputs to other programs and to autograd, which give gradients back contiguous: a backward
            # compiled for the padded stride then fails its stride check (seen on gpt:gpt2, NVIDIA H200).
            with inductor_config.patch(comprehensive_padding=False):
                return compile_fx_inner(gm, example_inputs)

        return {
            "fw_compiler": compile_unpadded,
            "bw_compiler": compile_unpadded,
            "decompositions": select_decomp_table(),
        }
    # The traced GraphModule's own forward, called as a function: no nn.Module call machinery each step
    # (and no module hooks, which CommDebugMode's module tracker would trip over).
    from torch._dynamo.backends.debugging import boxed_nop

    def run_traced(gm, example_inputs):
        return gm.forward

    # The backward takes its arguments boxed (one list it clears), as aot_eager's does, so each saved
    # activation is freed after its last use rather than when the whole backward returns.
    return {"fw_compiler": run_traced, "bw_compiler": boxed_nop}


class LoweredForward:
    """``module``'s forward as AOTAutograd-lowered local programs, traced per input signature."""

    def __init__(self, module: ParallelModule, compile: bool = False):
        self.module = module
        self.compile = compile
        self.programs: dict[tuple, Callable] = {}
        self.graphs: dict[str, torch.fx.GraphModule] = {}  # "forward"/"backward" -> the last traced program

    def __call__(self, *inputs):
        module = self.module
        names = list(module._param_of)
        params = [module._param_of[n] for n in names]
        buffers = [getattr(module, attr) for attr in module._buffer_of.values()]
        key = (torch.is_grad_enabled(), tuple(_signature(x) for x in inputs), tuple(p.requires_grad for p in params))
        program = self.programs.get(key)
        if program is None:
            program = self._trace(names)
            try:
                # The first call traces; node meta carries the recompute regions' annotations into the graph.
                with strided_shards_traceable(), fx_traceback.preserve_node_meta():
                    loss = program(params, buffers, list(inputs))
            except CFPError:
                raise
            except Exception as exc:  # AOTAutograd does not trace every graph; the interpreter runs it
                warnings.warn(
                    f"The model's step could not be lowered ({type(exc).__name__}: {str(exc)[:160]}); "
                    "this module runs on the DTensor interpreter.",
                    CFPWarning,
                    stacklevel=3,
                )
                module._lowered = None
                return module.forward(*inputs)
            self.programs[key] = program
            return loss
        return program(params, buffers, list(inputs))

    def _trace(self, param_names: list[str]) -> Callable:
        from torch._functorch.aot_autograd import aot_function

        module = self.module
        buffer_names = list(module._buffer_of)

        def step(params: list, buffers: list, inputs: list):
            values: dict[str, Any] = dict(zip(param_names, params))  # interpret(lowering=True) places their grads
            values.update(zip(buffer_names, buffers))
            values.update(zip(module._user_inputs, inputs))
            return module.interpret(values, lowering=True)

        options = aot_options(self.compile)
        options["partition_fn"] = recomputing_partition

        def keeping(kind: str, compiler: Callable) -> Callable:
            def compile_and_keep(gm: torch.fx.GraphModule, example_inputs):
                self.graphs[kind] = gm
                return compiler(gm, example_inputs)

            return compile_and_keep

        options["fw_compiler"] = keeping("forward", options["fw_compiler"])
        options["bw_compiler"] = keeping("backward", options["bw_compiler"])
        return aot_function(step, **options)
