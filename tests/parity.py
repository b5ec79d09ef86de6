"""Comparing a parallel module with the single-device model: the checks test_parallelize and test_models share."""

from __future__ import annotations

import torch

ATOL, RTOL = 1e-5, 1e-4


def close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """Whether ``a`` matches ``b`` within the parity tolerances, and their largest difference."""
    a, b = a.detach().float(), b.detach().float()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL), diff


def gradient_errors(params: dict, grads: dict[str, torch.Tensor], stats: dict) -> list[str]:
    """Every parameter has a gradient placed like itself and equal to the single-device one (``stats["grad_diff"]``)."""
    errors = []
    if set(params) != set(grads):
        errors.append(f"parameter names differ: {sorted(set(params) ^ set(grads))[:5]}")
    stats["grad_diff"] = 0.0
    for fqn, p in params.items():
        if p.grad is None:
            errors.append(f"{fqn}: no gradient")
            continue
        if tuple(p.grad.placements) != tuple(p.placements):
            errors.append(f"{fqn}: gradient placements {p.grad.placements} != parameter placements {p.placements}")
        ok, diff = close(p.grad.full_tensor(), grads[fqn])
        stats["grad_diff"] = max(stats["grad_diff"], diff)
        if not ok:
            errors.append(f"{fqn}: gradient differs by {diff:.3g}")
    return errors
