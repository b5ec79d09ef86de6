"""The optimizer CFP profiles, benches and trains with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from cfp.placements import local_tensor


def adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel: one call per step for all parameters, on their local shards.

    torch's CPU default is one call per parameter per op; with DTensor
    parameters each of those pays DTensor's dispatch in Python (on gpt:small,
    2 ranks: 1400 dispatches and about 20 ms a step). ``foreach`` dispatches
    once per op but allocates a temporary as large as all the parameters (the
    step's memory peak on data-parallel plans); ``fused`` does neither and
    steps in 5 ms where ``foreach`` takes 12 (data-parallel gpt:small).
    """
    return LocalAdamW(params, lr=lr, fused=True)


class LocalAdamW(torch.optim.AdamW):
    """Fused AdamW that runs its kernel on each DTensor parameter's local shard.

    Given DTensors, the one fused call still goes through DTensor's dispatch,
    which propagates shardings over its six lists of tensors in Python: 8.3 ms
    a step on gpt:small's 52 parameters where the same kernel on the shards
    takes 5.9 (one CPU thread, ``docs/bench/optimizer.py``); on an H200 the
    step's AdamW went from 2.5 ms to 0.9. AdamW is elementwise, so each shard steps
    alone to the same values. Its state is torch's AdamW's, DTensors where the
    parameters are (``state_dict``, ``torch.distributed.checkpoint``).
    """

    def __init__(self, params, lr: float, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, lr=lr, **kwargs)
        unsupported = ("amsgrad", "capturable", "differentiable")
        if not self.defaults["fused"] or any(self.defaults.get(k) for k in unsupported):
            raise ValueError(f"LocalAdamW runs the fused kernel only, without {', '.join(unsupported)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # The fused kernel takes tensors of one device and dtype per call.
            lists: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], [], [], []])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as torch's AdamW makes it, so either loads the other's state_dict
                    state["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                local, grad = local_tensor(p), local_tensor(p.grad)
                if not (local.is_contiguous() and grad.is_contiguous() and grad.shape == local.shape):
                    # the fused kernel walks all four tensors as flat arrays of the parameter's size, unchecked
                    raise ValueError(
                        f"LocalAdamW steps contiguous shards whose gradient is shaped like them: a parameter's "
                        f"shard is {tuple(local.shape)} (strides {local.stride()}), its gradient's "
                        f"{tuple(grad.shape)} (strides {grad.stride()})"
                    )
                tensors = (
                    local,
                    grad,
                    local_tensor(state["exp_avg"]),
                    local_tensor(state["exp_avg_sq"]),
                    state["step"],
                )
                for into, t in zip(lists[(local.device, local.dtype)], tensors):
                    into.append(t)
            beta1, beta2 = group["betas"]
            for params, grads, exp_avgs, exp_avg_sqs, steps in lists.values():
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    amsgrad=False,
                    maximize=group["maximize"],
                )
        return loss
