"""The optimizer CFP profiles, benches and trains with."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel: one call per step for all parameters.

    torch's CPU default is one call per parameter per op; with DTensor
    parameters each of those pays DTensor's dispatch in Python (on gpt:small,
    2 ranks: 1400 dispatches and about 20 ms a step). ``foreach`` dispatches
    once per op but allocates a temporary as large as all the parameters (the
    step's memory peak on data-parallel plans); ``fused`` does neither and
    steps in 5 ms where ``foreach`` takes 12 (data-parallel gpt:small).
    """
    return torch.optim.AdamW(params, lr=lr, fused=True)
