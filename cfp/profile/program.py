"""Block and transition programs on real tensors, and how they are timed.

A *block program* is what analysis propagates on ``meta`` tensors
(``cfp.propagate``), run on real data: the block's inputs and parameters as
DTensors with the config's placements, its ops by DTensor, backward from an
upstream gradient placed like the exits, then every parameter's gradient
reduced to the parameter's own placement.

It runs as ``cfp.parallelize`` trains (``RUNTIMES``): ``lowered`` (the
default) traces the block once with AOTAutograd, as ``cfp.lower`` traces a
whole step, into a forward and a backward program on local shards;
``compiled`` compiles those programs with inductor; ``interpreted``
dispatches every op through DTensor. Either way the parameters' gradient
reduction is a phase of its own, after backward: a training step reduces
every block's gradients together, in buckets at the end of backward, which
``ProfileTable`` prices from a profiled bucket (``cfp.buckets``).

The same program runs under a real process group (one process per rank) or
the fake one (``emulated``: collectives move no data). Data is seeded random:

- floating tensors: ``randn`` (parameters scaled by 0.02);
- buffers and constants (masks, positions, rotary tables): the model's own
  values when the model was built on a real device;
- integer and bool values the prologue computes (indices, masks): computed
  from the inputs they read;
- other integer inputs (token ids, targets): uniform in
  ``[0, m)`` where ``m`` is the smallest dimension of the block's floating
  parameters, so that every index is valid for the embedding or loss it feeds;
- other bool inputs: all ``True``.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from cfp.analyze import BlockGraph
from cfp.blocks import Block
from cfp.costs import TransitionKey
from cfp.errors import CFPWarning
from cfp.optim import adamw
from cfp.placements import Placements, replicate_partials, to_strs
from cfp.program import Collective, CommRecorder, GradPlacedLikeValue, make_dtensor, run_block
from cfp.propagate import (
    BlockStrategy,
    entry_placements,
    exit_gradients,
    input_values,
    needs_grad,
    reduce_gradients,
)


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def seeded(shape, dtype: torch.dtype, name: str, seed: int, device, high: int = 2, scale: float = 1.0) -> torch.Tensor:
    """The same tensor on every rank: seeded by ``seed`` and ``name``, made on the CPU."""
    gen = torch.Generator().manual_seed(_seed(seed, name))
    if dtype.is_floating_point:
        t = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale
        t = t.to(dtype)
    elif dtype == torch.bool:
        t = torch.ones(tuple(shape), dtype=torch.bool)
    else:
        t = torch.randint(0, max(high, 1), tuple(shape), generator=gen, dtype=dtype)
    return t.to(device)


def _wait(value) -> None:
    """Force DTensor's lazy (async) collectives to complete."""
    if isinstance(value, DTensor):
        local = value._local_tensor
        if hasattr(local, "wait"):
            local.wait()


_PROBES: dict[tuple, tuple[DeviceMesh, CallProbe | None]] = {}


class CallProbe:
    """A lowered program as cheap as one can be, called like a block's: its time is the per-call cost.

    A training step runs the whole model as one forward and one backward
    program; profiling calls one per block, and each call pays a fixed cost
    the step does not: AOTAutograd's runtime wrappers, DTensor's unwrapping
    of inputs and wrapping of outputs, starting the autograd engine, and the
    device synchronisation around the timed phase. This probe takes as many
    DTensor inputs and gives as many outputs as the block, on one element
    each, so ``BlockProgram`` can take its times off the block's (on this
    2-core CPU, 60-80 us of forward and 100-150 us of backward per block);
    ``TransitionProgram`` takes a one-in, one-out probe's off a redistribution.
    """

    def __init__(self, inputs: int, outputs: int, mesh: DeviceMesh, device: torch.device):
        from torch._functorch.aot_autograd import aot_function

        from cfp.lower import aot_options

        replicated = (Replicate(),) * mesh.ndim
        self.leaves = [
            make_dtensor(torch.zeros(1, device=device), mesh, replicated, requires_grad=True)
            for _ in range(max(inputs, 1))
        ]
        n = len(self.leaves)
        self.program = aot_function(
            lambda *xs: tuple(xs[i % n] * 1.0 for i in range(max(outputs, 1))), **aot_options(False)
        )
        self.program(*self.leaves)  # traces

    @classmethod
    def make(cls, inputs: int, outputs: int, mesh: DeviceMesh, device: torch.device) -> CallProbe | None:
        """The probe, or None where AOTAutograd cannot trace it; the program's times are then left whole.

        One probe per signature, mesh and device serves every program of a
        process: tracing it cost as much as tracing a small block, a fifth of
        a real profiling run. The cache keeps the mesh alive, so its ``id``
        names no other mesh (and ``cfp.mesh.device_mesh`` gives one process
        the same mesh for every profiling run on its group).
        """
        key = (inputs, outputs, id(mesh), str(device))
        if key not in _PROBES:
            try:
                probe = cls(inputs, outputs, mesh, device)
            except Exception:
                probe = None
            _PROBES[key] = (mesh, probe)
        return _PROBES[key][1]

    def net(self, forward_s: float, backward_s: float, sync, backward: bool) -> tuple[float, float]:
        """A program's forward and backward seconds less one call's (the backward's only if it ran), never below 0."""
        call_f, call_b = self.seconds(sync)
        return max(forward_s - call_f, 0.0), max(backward_s - call_b, 0.0) if backward else backward_s

    def seconds(self, sync) -> tuple[float, float]:
        """Forward and backward seconds of one call, timed as ``BlockProgram.iterate`` times a block's."""
        for leaf in self.leaves:
            leaf.grad = None
        sync()
        t0 = time.perf_counter()
        outs = self.program(*self.leaves)
        sync()
        t1 = time.perf_counter()
        grads = [torch.ones_like(o) for o in outs]
        sync()
        t2 = time.perf_counter()
        torch.autograd.backward(outs, grads)
        sync()
        return t1 - t0, time.perf_counter() - t2


PHASES = ("forward", "backward", "reduce", "optimizer")
RUNTIMES = ("lowered", "compiled", "interpreted")


@dataclass
class PhaseTimes:
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    reduce: list[float] = field(default_factory=list)
    optimizer: list[float] = field(default_factory=list)


class _Timed:
    """Warm-up, timed iterations, then one iteration that records (and times) the collectives.

    ``iterate`` returns the seconds of each of ``PHASES``. The recording
    iteration comes last, warm, so that its collective times are the steady
    state; its phase times are not used (recording perturbs them).
    """

    def measure(
        self, warmup: int, iters: int, sync=lambda: None, barrier=lambda: None
    ) -> tuple[PhaseTimes, list[Collective]]:
        for _ in range(max(warmup, 1)):
            self.iterate(sync, optimize=True)
        times = PhaseTimes()
        for _ in range(iters):
            barrier()
            phases, _, _ = self.iterate(sync, optimize=True)
            for name, seconds in zip(PHASES, phases):
                getattr(times, name).append(seconds)
        barrier()
        _, collectives, _ = self.iterate(sync, record=True, optimize=True)
        return times, collectives


class BlockProgram(_Timed):
    """One (block, config) as a runnable, timeable program on ``mesh``."""

    def __init__(
        self,
        graph: BlockGraph,
        block: Block,
        strategy: BlockStrategy,
        mesh: DeviceMesh,
        device: str | torch.device = "cpu",
        seed: int = 0,
        runtime: str = "lowered",
    ):
        self.graph, self.block, self.strategy, self.mesh = graph, block, strategy, mesh
        self.runtime = runtime
        self._lowered = None  # the AOTAutograd-traced block, made on the first iteration
        self._probe: CallProbe | None = None  # the per-call cost taken off the lowered block's times
        self.traced = graph.traced
        self.device = torch.device(device)
        self.seed = seed
        self.nodes = [self.traced.nodes[n] for n in block.nodes]
        self.entry = entry_placements(block, strategy.config)
        floats = [self.traced.nodes[i.name].meta["val"] for i in block.inputs if i.name in self.traced.params]
        dims = [d for v in floats if v.is_floating_point() for d in v.shape]
        self.int_high = min(dims) if dims else 2
        self.prologue_inputs = {  # the values the prologue computes (no parameter upstream), not graph inputs
            i.name for i in block.inputs if i.producer is None and self.traced.nodes[i.name].op == "call_function"
        }
        self.leaves: dict[str, DTensor] = {}  # input name -> DTensor (cached across iterations)
        self.globals: dict[str, torch.Tensor] = {}  # input name -> the global tensor it shards
        self.params: list[DTensor] = []
        self.optimizer: torch.optim.Optimizer | None = None

    # -- data -----------------------------------------------------------------
    def global_input(self, name: str) -> torch.Tensor:
        if name not in self.globals:
            val = self.traced.nodes[name].meta["val"]
            real = self._buffer_value(name)
            if real is None and name in self.prologue_inputs and not val.is_floating_point():
                real = self._computed(name)
            if real is not None:
                t = real.detach().to(self.device)
            else:
                scale = 0.02 if name in self.traced.params else 1.0
                t = seeded(val.shape, val.dtype, name, self.seed, self.device, self.int_high, scale)
            self.globals[name] = t
        return self.globals[name]

    def _computed(self, name: str) -> torch.Tensor | None:
        """An integer or bool value the prologue computes (an index, a mask), computed on the CPU from the inputs
        it reads, as the step computes it: a drawn index can be out of range (Falcon's ``qkv[:, :, [-2]]``).
        None where the prologue cannot run here; the value is then drawn."""
        values: dict[str, object] = {}

        def value(node: torch.fx.Node):
            if node.name not in values:
                if node.op == "placeholder":
                    # a copy: an in-place prologue op (a counter's add_) must not change the block's input
                    values[node.name] = self.global_input(node.name).to("cpu", copy=True)
                else:
                    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value)
                    values[node.name] = node.target(*args, **kwargs)
            return values[node.name]

        try:
            with torch.no_grad():
                out = value(self.traced.nodes[name])
        except Exception:
            return None
        return out if isinstance(out, torch.Tensor) else None

    def _buffer_value(self, name: str) -> torch.Tensor | None:
        fqn = self.traced.buffers.get(name)
        if fqn is None:
            return None
        exported = self.traced.exported
        value = exported.state_dict.get(fqn, exported.constants.get(fqn))
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            return value
        return None

    def make_input(self, node, placements: Placements) -> DTensor:
        if node.name not in self.leaves:
            grad = needs_grad(self.block, node.name, self.traced)
            self.leaves[node.name] = make_dtensor(
                self.global_input(node.name), self.mesh, placements, requires_grad=grad
            )
        return self.leaves[node.name]

    def exit_grad(self, out: DTensor) -> torch.Tensor:
        name = next(n for n in self.block.outputs if self._values.get(n) is out)
        key = "grad:" + name
        if key not in self.globals:  # made once: drawing random numbers is not part of the program
            self.globals[key] = seeded(out.shape, out.dtype, key, self.seed, self.device)
        return self.globals[key]

    # -- one iteration --------------------------------------------------------
    def iterate(
        self, sync=lambda: None, record: bool = False, optimize: bool = False
    ) -> tuple[tuple[float, ...], list[Collective], dict]:
        """Forward, backward, gradient reduction and (with ``optimize``) an AdamW
        step on the block's parameters; returns the seconds of each, the
        collectives seen and timed (only when ``record``) and the values."""
        for leaf in self.leaves.values():
            leaf.grad = None
        recs = {p: CommRecorder(self.mesh, p, sync) for p in ("forward", "backward", "reduce")} if record else {}

        def ctx(p):
            return recs[p] if record else contextlib.nullcontext()

        if self.runtime != "interpreted" and self._lowered is None:
            self._lower()
        sync()
        t0 = time.perf_counter()
        with ctx("forward"):
            values = self._forward(recs.get("forward"))
            for name in self.block.outputs:
                _wait(values.get(name))
        sync()
        t1 = time.perf_counter()
        self._values = values
        self.params = [values[i.name] for i in self.block.inputs if i.name in self.traced.params]
        inputs = input_values(self.block, values)
        outs, grads = exit_gradients(self.block, values, self.mesh, self.exit_grad)
        sync()
        t1b = time.perf_counter()  # the upstream gradients are given, not computed, in a training step
        with ctx("backward"):
            if outs:
                torch.autograd.backward(outs, grads)
            for g in reduce_gradients(inputs, self.mesh, recs.get("backward")):
                _wait(g)
            for p in self.params:
                _wait(p.grad)
        sync()
        t2 = time.perf_counter()
        with ctx("reduce"):
            reduced = reduce_gradients(self.params, self.mesh, recs.get("reduce"))
            for g in reduced:
                _wait(g)
        sync()
        t3 = time.perf_counter()
        optimizer_s = self.step(reduced, sync) if optimize and self.params else 0.0
        collectives = [c for r in recs.values() for c in r.collectives]
        forward_s, backward_s = t1 - t0, t2 - t1b
        if self._probe is not None and not record:
            forward_s, backward_s = self._probe.net(forward_s, backward_s, sync, backward=bool(outs))
        return (forward_s, backward_s, t3 - t2, optimizer_s), collectives, {"values": values, "grads": reduced}

    def _forward(self, recorder: CommRecorder | None) -> dict[str, object]:
        """The block's values by name: its inputs (the cached leaves) and what its ops made."""
        if self._lowered is None:
            return run_block(self.nodes, self.mesh, self.entry, self.make_input, recorder=recorder).values
        outs = self._lowered(*self.leaves.values())
        return {**self.leaves, **dict(zip(self._lowered_outputs, outs))}

    def _lower(self) -> None:
        """Trace the block, from its leaves to its tensor exits, into AOTAutograd's programs.

        One DTensor run first makes the leaves (with the placements DTensor's
        rules give them). In the traced function each input made by another
        block passes through ``GradPlacedLikeValue``, so the backward program
        brings its gradient to its placements, as ``input_values`` does for
        the interpreted block and as the lowered training step does. The
        parameters' gradients leave the program unreduced, for the reduce
        phase.
        """
        from torch._functorch.aot_autograd import aot_function

        from cfp.lower import aot_options, strided_shards_traceable

        run = run_block(self.nodes, self.mesh, self.entry, self.make_input)
        sent_back = {i.name for i in self.block.inputs if i.producer is not None}  # parameters: the reduce phase
        names = list(self.leaves)
        self._lowered_outputs = [n for n in self.block.outputs if isinstance(run.values.get(n), torch.Tensor)]

        # AOTAutograd regenerates an output that is a view of an input, or of another output, with
        # as_strided, which DTensor does not support, and refuses outputs aliasing one another when
        # compiling: such exits (slices of a buffer; a transpose of the block's sum that is an exit too)
        # leave the program as copies. Where the trace sees more aliasing than eager DTensor shows (views
        # of one value that eager redistributions copied apart), a second trace copies every exit that is
        # a view.
        def storage(t):
            return t.to_local().untyped_storage().data_ptr() if isinstance(t, DTensor) else None

        def is_view(t):
            return isinstance(t, DTensor) and t.to_local()._base is not None

        outs = {n: run.values[n] for n in self._lowered_outputs}
        inputs = {storage(leaf) for leaf in self.leaves.values()}
        shared = Counter(storage(v) for v in outs.values())
        copies = {n for n, v in outs.items() if storage(v) in inputs or (shared[storage(v)] > 1 and is_view(v))}
        attempts = [copies, copies | {n for n, v in outs.items() if is_view(v)}]

        def block(copies, *leaves):
            given = {
                n: GradPlacedLikeValue.apply(v) if n in sent_back and v.requires_grad else v
                for n, v in zip(names, leaves)
            }
            values = run_block(self.nodes, self.mesh, self.entry, lambda node, placements: given[node.name]).values
            return tuple(values[n].clone() if n in copies else values[n] for n in self._lowered_outputs)

        for copies in attempts[:1] if attempts[1] == attempts[0] else attempts:
            lowered = aot_function(functools.partial(block, copies), **aot_options(self.runtime == "compiled"))
            try:
                with strided_shards_traceable():
                    lowered(*self.leaves.values())  # traces (the grads it leaves are cleared by the next iteration)
                break
            except Exception as exc:  # AOTAutograd does not trace every block; the interpreter runs it
                error = exc
        else:
            warnings.warn(
                f"Block {self.block.anchor} could not be lowered ({type(error).__name__}: {str(error)[:160]}); "
                "it is timed on the DTensor interpreter.",
                CFPWarning,
                stacklevel=2,
            )
            self.runtime = "interpreted"
            return
        self._lowered = lowered
        self._probe = CallProbe.make(len(self.leaves), len(self._lowered_outputs), self.mesh, self.device)

    def step(self, grads: list, sync) -> float:
        """Seconds an AdamW step (as examples/train.py takes) adds for this block's parameters.

        A training step calls the optimizer once for all blocks, so the fixed
        cost of a call, timed on a one-element parameter, is taken off. The
        step is timed as a training step runs it, for each block: its data
        cold (a whole model's parameters, gradients and moments do not fit in
        a CPU's cache; this block's just-computed gradients would), DTensor's
        dispatch warm (its cold cost, about 0.3 ms on a CPU, a training step
        pays once, not once per block: summed over blocks it had made the
        predicted optimizer time 1.4-2x the measured one on gpt and llama).
        """
        if self.optimizer is None:
            self.optimizer = adamw(self.params, lr=1e-6)
            probe = make_dtensor(
                torch.zeros(1, device=self.device), self.mesh, (Replicate(),) * self.mesh.ndim, requires_grad=True
            )
            probe.grad = torch.zeros_like(probe)
            self.probe = adamw([probe], lr=1e-6)
        for p, g in zip(self.params, grads):
            p.grad = g
        if self.device.type == "cpu":
            _flush_cpu_caches()
        self.probe.step()  # warms the dispatch path, not the block's parameters and moments
        times = []
        for opt in (self.optimizer, self.probe):
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - start)
        return max(times[0] - times[1], 0.0)

    def estimated_memory(self) -> int:
        """Per-rank bytes from analysis' local shapes: parameters, their gradients, every op output."""
        return 2 * self.strategy.param_bytes + self.strategy.activation_bytes


_FLUSH: torch.Tensor | None = None


def _flush_cpu_caches() -> None:
    """Evict the CPU's last-level cache (64 MiB written covers common L3 sizes per core complex)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(16 * 2**20)
    _FLUSH.fill_(0.0)


def reference(program: BlockProgram) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same ops on one device with plain tensors: exit values and parameter gradients."""
    import operator

    env: dict[str, object] = {}
    leaves: dict[str, torch.Tensor] = {}
    for node in program.nodes:
        for arg in node.all_input_nodes:
            if arg.name not in env and arg.name not in {n.name for n in program.nodes}:
                t = program.global_input(arg.name).clone()
                if t.is_floating_point() and needs_grad(program.block, arg.name, program.traced):
                    t.requires_grad_(True)
                leaves[arg.name] = t
                env[arg.name] = t
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n.name])
        env[node.name] = operator.getitem(*args) if node.target is operator.getitem else node.target(*args, **kwargs)
    outs, grads = [], []
    for name in program.block.outputs:
        out = env[name]
        if isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point():
            outs.append(out)
            grads.append(seeded(out.shape, out.dtype, "grad:" + name, program.seed, program.device))
    torch.autograd.backward(outs, grads)
    values = {n: env[n] for n in program.block.outputs}
    pgrads = {n: leaves[n].grad for n in leaves if n in program.traced.params}
    return values, pgrads


class TransitionProgram(_Timed):
    """``DTensor.redistribute`` of one value from ``src`` to ``dst`` placements, forward and backward."""

    def __init__(self, key: TransitionKey, mesh: DeviceMesh, device="cpu", seed: int = 0, runtime: str = "lowered"):
        self.key, self.mesh, self.device = key, mesh, torch.device(device)
        self.src, self.dst = key.src, key.dst
        dtype = getattr(torch, key.dtype)
        full = seeded(key.shape, dtype, "transition", seed, self.device, high=2)
        base = make_dtensor(full, mesh, self.src, requires_grad=False)
        self.x = DTensor.from_local(
            base.to_local(), mesh, self.src, run_check=False, shape=base.shape, stride=base.stride()
        )
        self.differentiable = dtype.is_floating_point
        if self.differentiable:
            self.x = self.x.detach().requires_grad_(True)
            self.grad = make_dtensor(
                seeded(key.shape, dtype, "transition-grad", seed, self.device),
                mesh,
                replicate_partials(self.dst),
                requires_grad=False,
            )
        self.redistribute = lambda x: x.redistribute(self.mesh, self.dst)
        self._probe: CallProbe | None = None  # as BlockProgram's: the step runs the collective inside its program
        if runtime != "interpreted":  # the collectives as a lowered step runs them
            from torch._functorch.aot_autograd import aot_function

            from cfp.lower import aot_options, strided_shards_traceable

            lowered = aot_function(self.redistribute, **aot_options(runtime == "compiled"))
            try:
                with strided_shards_traceable():
                    lowered(self.x)  # traces
                self.redistribute = lowered
                self._probe = CallProbe.make(1, 1, mesh, self.device)
            except Exception as exc:  # AOTAutograd does not trace every redistribution; the interpreter runs it
                warnings.warn(
                    f"The transition {to_strs(key.src)} -> {to_strs(key.dst)} of {key.shape} could not be lowered "
                    f"({type(exc).__name__}: {str(exc)[:160]}); it is timed on the DTensor interpreter.",
                    CFPWarning,
                    stacklevel=2,
                )

    def iterate(self, sync=lambda: None, record: bool = False, optimize: bool = False):
        self.x.grad = None
        recs = {p: CommRecorder(self.mesh, p, sync) for p in ("forward", "backward")} if record else {}

        def ctx(p):
            return recs[p] if record else contextlib.nullcontext()

        sync()
        t0 = time.perf_counter()
        with ctx("forward"):
            y = self.redistribute(self.x)
            _wait(y)
        sync()
        t1 = time.perf_counter()
        if self.differentiable:
            with ctx("backward"):
                y.backward(self.grad)
                _wait(self.x.grad)
        sync()
        t2 = time.perf_counter()
        collectives = [c for r in recs.values() for c in r.collectives]
        forward_s, backward_s = t1 - t0, t2 - t1
        if self._probe is not None and not record:
            forward_s, backward_s = self._probe.net(forward_s, backward_s, sync, backward=self.differentiable)
        return (forward_s, backward_s, 0.0, 0.0), collectives, {"y": y}

    def estimated_memory(self) -> int:
        local = self.x.to_local()
        return 3 * local.numel() * local.element_size()
