"""Materialising a model built on ``meta``, one module at a time, straight into this rank's shards.

``materialize(model, placements, mesh)`` gives every parameter of a model
whose tensors are on ``meta`` real values as a DTensor ``nn.Parameter`` with
the placements ``placements`` names for it (the plan's, storage placements for
a ZeRO-stored one), and every buffer a whole tensor on the mesh's device.
No rank ever holds the whole model: modules are materialised one at a time,
each module's own tensors (``recurse=False``) made full with ``torch.empty``,
initialised, cut to this rank's shard and freed before the next module.

The initialisation is the model's own, replayed in the order construction
runs it, so that, for the same seed, the shards are exactly those of the
single-device model (every rank draws the same numbers; ``torch.manual_seed(s);
Model()`` on one device, sharded, is what each rank keeps):

1. *construction*: ``module.reset_parameters()`` for every module that defines
   it, children before parents (post-order, as ``nn.Module.apply``): the order
   construction runs it when each module initialises its own tensors at the end
   of its ``__init__``, as every ``torch.nn`` module does;
2. then each function of ``init_fn`` (one, or a list: one pass each), called
   as ``fn(module)`` for every module in ``model.modules()`` order (the order
   of a loop over ``model.named_parameters()``). A function may only touch the
   module's own parameters and buffers (``recurse=False``): its children are
   still on ``meta``. A whole-model init written as ``for name, p in
   self.named_parameters(): ...`` becomes one such pass; ``self.apply(fn)``
   too, when only leaf modules draw random numbers.

A module's tensors depend on every pass, but only one module may be full at a
time: pass ``k`` rebuilds the module's values from passes ``0..k-1`` by
replaying them from the random state each started from (recorded), then
runs pass ``k`` from the running state. Compute grows with the number of
passes, memory does not.

Tied parameters (an output head sharing the embedding) stay tied: the first
module holding one in construction order owns it; a later holder's
``reset_parameters`` runs on a scratch tensor of its own, as construction ran
it before the tie replaced it. A tied tensor stays full from its owner's
construction to the end (every holder's init pass may write it).

A parameter or buffer that no pass writes (in place, or by assigning a new
tensor) is an error naming it: ``torch.empty`` would hand out garbage. That
catches what ``meta`` loses: buffers computed in ``__init__`` (causal masks,
rotary tables, position ids) and parameters made from ``torch.ones(...)``.
Give their module a ``reset_parameters`` that computes them, or pass an
``init_fn`` that does.

Limits: the equality with one device holds when the model's construction
follows the order above (a module drawing random numbers in its own
``reset_parameters`` after building children that draw too is post-order;
a ``reset_parameters`` that re-initialises its children finds them on
``meta`` here and draws nothing for them; anything else is not replayed as
it ran); a model built in one dtype and cast afterwards is initialised here
in its meta dtype; buffers are kept whole on every rank, as
``cfp.parallelize`` holds them. The model is changed in place: its
parameters become the DTensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from cfp.errors import CFPError

InitFn = Callable[[nn.Module], None]


def on_meta(model: nn.Module) -> bool:
    """Whether any of the model's parameters or buffers is on ``meta``."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _reset(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _post_order(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for child in module.children():
            visit(child)
        out.append(module)

    visit(model)
    return out


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


@dataclass
class _Slot:
    """One of a module's own tensors: ``module._parameters[name]`` or ``module._buffers[name]``."""

    module: nn.Module
    name: str
    is_param: bool
    meta: torch.Tensor  # the tensor the model was built with (its identity names tied slots)

    def get(self) -> torch.Tensor | None:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]

    def set(self, value: torch.Tensor) -> None:
        if self.is_param and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=self.meta.requires_grad)
        (self.module._parameters if self.is_param else self.module._buffers)[self.name] = value


def _slots(module: nn.Module) -> list[_Slot]:
    return [_Slot(module, n, True, p) for n, p in module._parameters.items() if p is not None] + [
        _Slot(module, n, False, b) for n, b in module._buffers.items() if b is not None
    ]


def _empty(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device)


def _shard(full: torch.Tensor, mesh: DeviceMesh, placements) -> DTensor:
    """This rank's shard of ``full`` (the same on every rank), without communication, owning its memory."""
    dt = distribute_tensor(full.detach(), mesh, placements, src_data_rank=None)
    return DTensor.from_local(
        dt.to_local().clone(), mesh, dt.placements, run_check=False, shape=dt.shape, stride=dt.stride()
    )


@torch.no_grad()
def materialize(
    model: nn.Module,
    placements: Mapping[str, tuple],
    mesh: DeviceMesh,
    init_fn: InitFn | Sequence[InitFn] | None = None,
    seed: int | None = None,
) -> None:
    """Replace the meta tensors of ``model`` in place (see the module docstring).

    ``placements`` maps a parameter FQN (any alias of a tied one) to its
    placements on ``mesh``; a parameter it leaves out is initialised (its
    random numbers drawn) but stays on ``meta``. ``seed`` seeds the device's
    generator first; without it, every rank must be in the same random state.
    """
    device = (
        torch.device(mesh.device_type, torch.cuda.current_device())
        if mesh.device_type == "cuda"
        else torch.device(mesh.device_type)
    )
    if seed is not None:
        torch.manual_seed(seed)
    gen = _generator(device)
    passes: list[InitFn] = [_reset]
    if init_fn is not None:
        passes += [init_fn] if callable(init_fn) else list(init_fn)
    post = _post_order(model)
    pre = list(model.modules())
    orders = [post] + [pre] * (len(passes) - 1)
    last = len(passes) - 1

    slots = {id(m): _slots(m) for m in post}
    holders: dict[int, list[_Slot]] = {}
    for m in post:  # construction order decides a tied tensor's owner
        for s in slots[id(m)]:
            holders.setdefault(id(s.meta), []).append(s)
    tied = {key for key, hs in holders.items() if len(hs) > 1}
    live: dict[int, torch.Tensor] = {}  # tied tensor -> its full value, from its owner's construction on
    unwritten: list[str] = []
    fqn_of: dict[int, str] = {}
    for prefix, m in model.named_modules():
        for s in slots[id(m)]:
            fqn_of.setdefault(id(s.meta), f"{prefix}.{s.name}" if prefix else s.name)
    placed = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for fqn, pl in placements.items():
        if fqn in params:
            placed[id(params[fqn])] = pl

    started: dict[tuple[int, int], torch.Tensor] = {}  # (pass, module) -> random state it started from
    final: dict[int, torch.Tensor] = {}  # tensor -> its value, full, once every pass has run
    tied_made: dict[int, torch.Tensor] = {}  # tied tensor -> the object its owner's construction installed
    for k, init in enumerate(passes):
        for m in orders[k]:
            own = slots[id(m)]
            # Fresh full tensors, written by a replay of the earlier passes (tied ones: scratch).
            installed = {}
            for s in own:
                s.set(_empty(s.meta, device))
                installed[id(s.meta)] = s.get()
            running = gen.get_state()
            for q in range(k):
                gen.set_state(started[q, id(m)])
                passes[q](m)
            for s in own:
                key = id(s.meta)
                if key in tied and k == 0 and holders[key][0] is s:  # the owner's construction makes it
                    tied_made[key] = installed[key]
                elif key in tied and k > 0:
                    s.set(live[key])
            gen.set_state(running)
            started[k, id(m)] = running
            init(m)
            for s in own:
                key, value = id(s.meta), s.get()
                if key in tied and (k > 0 or holders[key][0] is s):
                    live[key] = value
                elif key not in tied and k == last:
                    if value is installed[key] and value._version == 0:
                        unwritten.append(fqn_of[key])
                    elif key in placed:
                        final[key] = _shard(value, mesh, placed[key])  # the full tensor dies here
                    elif not s.is_param:
                        final[key] = value.detach()  # buffers stay whole
                s.set(s.meta)  # back to meta: one module full at a time
            del installed

    for key, value in live.items():
        if value is tied_made[key] and value._version == 0:
            unwritten.append(fqn_of[key])
        elif key in placed:
            final[key] = _shard(value, mesh, placed[key])
        elif not holders[key][0].is_param:
            final[key] = value.detach()
    live.clear()
    if unwritten:
        raise CFPError(
            f"Materialising the meta model left {', '.join(unwritten[:5])}{' ...' if len(unwritten) > 5 else ''} "
            "uninitialised: no reset_parameters() or init_fn wrote it (a buffer computed in __init__ is lost on "
            "meta). Give its module a reset_parameters() that computes it, or pass an init_fn that does."
        )
    made: dict[int, torch.Tensor] = {}
    for m in post:
        for s in slots[id(m)]:
            key = id(s.meta)
            if key not in final:
                continue  # a parameter the plan does not place stays on meta
            if key not in made:
                made[key] = nn.Parameter(final[key], requires_grad=s.meta.requires_grad) if s.is_param else final[key]
            s.set(made[key])  # tied holders share one object again
