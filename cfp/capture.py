"""Capture: a model and its example inputs become a ``TracedModel``.

``torch.export`` gives an aten-level FX graph whose nodes carry their output
shapes and dtypes in ``node.meta["val"]``; the graph signature maps
placeholders to parameter and buffer FQNs. Everything here works on ``meta``
models, so a 175B-parameter shape is analysed without its memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import operator
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch._ops import OpOverload
from torch.export.graph_signature import InputKind
from torch.fx import Node
from torch.utils.flop_counter import FlopCounterMode

from cfp.errors import CFPError
from cfp.spec import ModelSpec, Workload


@dataclass
class TracedModel:
    """An exported training-loss graph plus what the later stages read off it."""

    exported: torch.export.ExportedProgram
    params: dict[str, str]  # placeholder name -> parameter FQN
    buffers: dict[str, str]  # placeholder name -> buffer / constant FQN
    user_inputs: list[str]  # placeholder names of the example inputs
    flops: dict[str, int]  # forward FLOPs per call_function node
    aliases: dict[str, str] = field(default_factory=dict)  # tied parameter FQN -> the FQN the graph uses
    frozen: set[str] = field(default_factory=set)  # placeholder names of parameters that do not require grad
    spec: ModelSpec | None = None
    nodes: dict[str, Node] = field(init=False)

    def __post_init__(self):
        self.nodes = {n.name: n for n in self.graph.nodes}

    @property
    def graph(self) -> torch.fx.Graph:
        return self.exported.graph_module.graph

    def ops(self) -> list[Node]:
        return [n for n in self.graph.nodes if n.op == "call_function"]

    def param_shapes(self) -> dict[str, torch.Size]:
        return {fqn: self.nodes[name].meta["val"].shape for name, fqn in self.params.items()}

    def num_parameters(self) -> int:
        return sum(shape.numel() for shape in self.param_shapes().values())

    def forward_flops(self) -> int:
        return sum(self.flops.values())

    def activation_bytes(self) -> int:
        """Bytes of every op output: what autograd would save if it kept all."""
        return sum(_bytes(n.meta.get("val")) for n in self.ops())

    def op_counts(self) -> Counter:
        return Counter(op_name(n) for n in self.ops())

    def fingerprint(self) -> str:
        """A hash of the graph's structure, shapes and parameter names.

        Two models with the same fingerprint run the same program, so a plan
        made for one applies to the other.
        """
        h = hashlib.sha256()
        for n in self.graph.nodes:
            val = n.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
            dtype = str(val.dtype) if isinstance(val, torch.Tensor) else None
            # The device a graph was captured on (meta to plan, cpu or cuda to train) is not its structure.
            args = [
                a.name if isinstance(a, Node) else "device" if isinstance(a, torch.device) else repr(a) for a in n.args
            ]
            h.update(repr((n.op, op_name(n), shape, dtype, args)).encode())
        h.update(repr(sorted(self.params.items())).encode())
        return h.hexdigest()[:16]


BUFFER = "cfp_buffer"  # a placeholder's meta key: the FQN of the buffer it is


def is_buffer(node) -> bool:
    """Whether a graph node is a placeholder of one of the model's buffers (or tensor constants)."""
    return isinstance(node, Node) and node.op == "placeholder" and BUFFER in node.meta


def op_name(node: Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(getattr(node.target, "__name__", node.target)).replace(".default", "")


def _bytes(val) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum(_bytes(v) for v in val)
    return 0


def as_meta(val):
    """A meta tensor with the shape, stride and dtype of a (fake) tensor."""
    if isinstance(val, torch.Tensor):
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
    if isinstance(val, (tuple, list)):
        return type(val)(as_meta(v) for v in val)
    return val


def count_flops(graph: torch.fx.Graph) -> dict[str, int]:
    """Forward FLOPs per node, by running each op once on meta tensors."""
    flops: dict[str, int] = {}
    counter = FlopCounterMode(display=False)
    with counter:
        for node in graph.nodes:
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: as_meta(n.meta.get("val")))
            before = counter.get_total_flops()
            try:
                node.target(*args, **kwargs)
            except Exception:
                continue  # an op meta cannot run has no formula in the counter either
            flops[node.name] = counter.get_total_flops() - before
    return flops


def _tied_aliases(model: torch.nn.Module, params: dict[str, str], graph: torch.fx.Graph) -> dict[str, str]:
    """Tied parameters (one tensor, several FQNs) reach the graph once; map the others to it.

    torch.export keeps a placeholder for every FQN but routes all uses through one.
    """
    used = {n.name for n in graph.nodes if n.op == "placeholder" and n.users}
    fqn_used = {fqn: name in used for name, fqn in params.items()}
    by_tensor: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(fqn)
    aliases = {}
    for fqns in by_tensor.values():
        canonical = next((f for f in fqns if fqn_used.get(f)), fqns[0])
        aliases.update({f: canonical for f in fqns if f != canonical})
    return aliases


@contextlib.contextmanager
def _without_partial_graph():
    """torch.export prints the partial graph of a model it cannot trace to stderr (dozens of lines) before raising;
    CFP's error names the cause instead. Everything else export writes to stderr is passed on."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except Exception as exc:
        text = buffer.getvalue()
        if hasattr(exc, "partial_fx_graph"):
            text = text.replace(f"{exc.partial_fx_graph}\n", "")
        sys.stderr.write(text)
        raise
    else:
        sys.stderr.write(buffer.getvalue())


def _inline_grad_regions(gm: torch.fx.GraphModule) -> None:
    """Inline the ``torch.no_grad()`` (and ``enable_grad``) regions of a forward into its graph.

    torch.export keeps a region whose grad mode differs from the trace's as a
    ``wrap_with_set_grad_enabled`` call of a submodule (a MoE router's
    sparsemixer under ``no_grad``, in transformers' PhiMoE): its nodes are
    not the graph's, so blocks, propagation and profiles would not see them.
    Inlined, its ops are ordinary ones, and a ``no_grad`` region's outputs
    are detached, so no gradient flows back through them, as in the model.
    """
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    graph = gm.graph
    while regions := graph.find_nodes(op="call_function", target=hop):
        for node in regions:
            enabled, submodule, *operands = node.args
            body = getattr(gm, submodule.target)
            env = dict(zip(body.graph.find_nodes(op="placeholder"), operands))
            with graph.inserting_before(node):
                for inner in body.graph.nodes:
                    if inner.op == "placeholder":
                        continue
                    if inner.op == "output":
                        outputs = torch.fx.node.map_arg(inner.args[0], env.__getitem__)
                        break
                    if inner.op == "get_attr":  # a nested region's submodule
                        name = _free_attr(gm, inner.target)
                        setattr(gm, name, getattr(body, inner.target))
                        env[inner] = graph.get_attr(name)
                        env[inner].meta = dict(inner.meta)
                        continue
                    env[inner] = graph.node_copy(inner, env.__getitem__)
                if not enabled:
                    outputs = type(outputs)(_detached(graph, out) for out in outputs)
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise CFPError(f"A grad-mode region's result is read by {user.format_node()}, not indexed.")
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(node)
            if not submodule.users:
                graph.erase_node(submodule)
                delattr(gm, submodule.target)
    graph.lint()
    gm.recompile()


def _fresh(node) -> bool:
    """Whether a node's value is a tensor of its own: an aten op's result that its schema says aliases no input."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return _fresh(node.args[0])
    return isinstance(node.target, OpOverload) and all(r.alias_info is None for r in node.target._schema.returns)


def _functional_twin(node) -> OpOverload | None:
    """``aten.add.Tensor`` for a node of ``aten.add_.Tensor``: the out-of-place op of an in-place one."""
    op = node.target
    if not isinstance(op, OpOverload) or not op._schema.arguments:
        return None
    first = op._schema.arguments[0].alias_info
    name = op._schema.name.split("::")[-1]
    if first is None or not first.is_write or not name.endswith("_"):
        return None
    packet = getattr(getattr(torch.ops, op.namespace), name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _functionalize_activation_updates(gm: torch.fx.GraphModule) -> None:
    """Rewrite in-place ops on activations (``x += residual``, ``nn.ReLU(inplace=True)``) out of place.

    torch.export keeps them as ``aten.add_`` and ``aten.relu_``. Where the
    updated activation is another block's exit, the block would update its
    own input in place: an input that analysis and profiling make a leaf
    tensor, which autograd refuses to update. Out of place, later readers of
    the activation read the new value instead, which is what they read in the
    model. Only activations that alias nothing are rewritten (a view's update
    also changes its base): buffers stay updated in place, as BatchNorm's
    running statistics must be.
    """
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}  # a rewritten op takes the place of the one it replaces
    changed = False
    for node in list(graph.nodes):
        twin = _functional_twin(node) if node.op == "call_function" else None
        target = node.args[0] if twin is not None and node.args else None
        if not (isinstance(target, Node) and _fresh(target)):
            continue
        readers = [u for u in target.users if u is not node and order[u] < order[node]]
        if not all(_fresh(u) for u in readers):  # a view taken before the update would see it
            continue
        with graph.inserting_before(node):
            updated = graph.call_function(twin, node.args, node.kwargs)
        updated.meta = dict(node.meta)
        order[updated] = order[node]
        node.replace_all_uses_with(updated)
        after = {u for u in target.users if order[u] > order[node]}
        target.replace_all_uses_with(updated, delete_user_cb=after.__contains__)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()


def _refuse_data_dependent_shapes(graph: torch.fx.Graph, spec: str) -> None:
    """A shape computed from tensor values (tokens per expert, split by ``.tolist()``) is a symbol in the graph.
    Blocks are profiled and sharded at the example's shapes, so CFP needs every shape static."""
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape):
            producer = node.args[0] if node.target is operator.getitem else node
            raise CFPError(
                f"Model {spec!r} has data-dependent shapes: {node.name} is {list(val.shape)}, sized by tensor "
                f"values ({producer.target}). CFP profiles and shards the example's shapes, so every shape must be "
                f"static: route tokens with a fixed capacity (dense dispatch, as examples/moe.py does) instead of "
                f"splitting them by their counts."
            )


def _free_attr(gm: torch.nn.Module, name: str) -> str:
    candidate, i = name, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def _detached(graph: torch.fx.Graph, node):
    if not (isinstance(node, Node) and isinstance(node.meta.get("val"), torch.Tensor)):
        return node
    if not node.meta["val"].is_floating_point():
        return node  # nothing to cut: no gradient reaches an integer or bool tensor
    detached = graph.call_function(torch.ops.aten.detach.default, (node,))
    detached.meta = {**node.meta, "val": node.meta["val"].detach()}
    return detached


def _said(exc: Exception) -> str:
    """An exception's type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _eager_failure(model: torch.nn.Module, inputs: tuple) -> Exception | None:
    """What running the model once on its inputs raises, if it does: export's error for a model that fails
    anyway (a configuration whose shapes do not agree) would blame tracing. Not on ``meta`` tensors, where
    data-dependent ops fail that run on real ones."""
    tensors = [t for t in (*model.parameters(), *inputs) if isinstance(t, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        return None
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        return exc
    return None


def capture(workload: Workload) -> TracedModel:
    """Export the workload's training step (forward to the loss)."""
    model, inputs = workload.model, workload.inputs
    try:
        with _without_partial_graph():
            exported = torch.export.export(model, inputs, strict=False)
    except Exception as exc:
        failure = _eager_failure(model, inputs)
        if failure is not None:
            raise CFPError(
                f"Model {workload.spec.spec!r} fails when run, before any tracing: {_said(failure)} Check the "
                f"model's configuration or the factory's arguments (--arg); run with --debug for the traceback."
            ) from failure
        raise CFPError(
            f"Model {workload.spec.spec!r} cannot be traced by torch.export: {_said(exc)} CFP needs a graph "
            f"without data-dependent control flow; run with --debug for the traceback."
        ) from exc
    _inline_grad_regions(exported.graph_module)
    _functionalize_activation_updates(exported.graph_module)
    _refuse_data_dependent_shapes(exported.graph, workload.spec.spec)
    loss = [n for n in exported.graph.nodes if n.op == "output"][0].args[0]
    if not (len(loss) == 1 and isinstance(loss[0].meta.get("val"), torch.Tensor) and loss[0].meta["val"].dim() == 0):
        raise CFPError(
            f"Model {workload.spec.spec!r} must return one scalar loss from forward "
            f"(training is the workload CFP plans for)."
        )
    params, buffers, user_inputs = {}, {}, []
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            params[spec.arg.name] = spec.target
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            buffers[spec.arg.name] = spec.target
            placeholders[spec.arg.name].meta[BUFFER] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(spec.arg.name)
    aliases = _tied_aliases(model, params, exported.graph)
    params = {name: fqn for name, fqn in params.items() if fqn not in aliases}
    named = dict(model.named_parameters(remove_duplicate=False))
    frozen = {name for name, fqn in params.items() if fqn in named and not named[fqn].requires_grad}
    return TracedModel(
        exported=exported,
        params=params,
        aliases=aliases,
        frozen=frozen,
        buffers=buffers,
        user_inputs=user_inputs,
        flops=count_flops(exported.graph),
        spec=workload.spec,
    )
