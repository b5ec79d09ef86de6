"""cfp.optim.adamw: torch's fused AdamW, stepping DTensor parameters on their local shards."""

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from cfp.mesh import fake_mesh, parse_mesh
from cfp.optim import adamw


def test_adamw_steps_shards_as_torch_steps_the_whole():
    """Three steps on a 2-rank mesh (rank 0's shards) equal torch's AdamW on the full tensors, bit for bit;
    the state is torch's, DTensors like the parameters, so either optimizer loads the other's state_dict."""
    torch.manual_seed(0)
    full = [torch.randn(6, 4), torch.randn(5)]
    grads = [[torch.randn_like(t) for t in full] for _ in range(3)]
    placements = [[Shard(0)], [Replicate()]]
    ref = [torch.nn.Parameter(t.clone()) for t in full]
    reference = torch.optim.AdamW(ref, lr=1e-2, fused=True)
    with fake_mesh(parse_mesh("2")) as mesh:
        ours = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(full, placements)]
        optimizer = adamw(ours, lr=1e-2)
        for gs in grads:
            for p, q, g, pl in zip(ref, ours, gs, placements):
                p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), mesh, pl)
            reference.step()
            optimizer.step()
        assert torch.equal(ours[0].to_local(), ref[0].detach()[:3])
        assert torch.equal(ours[1].to_local(), ref[1].detach())
        state = optimizer.state_dict()["state"]
        assert list(state[0]) == list(reference.state_dict()["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
        assert state[0]["exp_avg"].placements == (Shard(0),) and float(state[0]["step"]) == 3.0


def test_adamw_refuses_a_gradient_shaped_unlike_its_shard():
    """The fused kernel walks parameter, gradient and state as flat arrays of the parameter's size without
    checking them: a gradient placed unlike its parameter (here replicated, twice the shard) is refused rather
    than read out of bounds (torch's ``_fused_adamw_`` steps a 1000-element parameter on a 500-element
    gradient without a word)."""
    with fake_mesh(parse_mesh("2")) as mesh:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(6, 4), mesh, [Replicate()])
        with pytest.raises(ValueError, match=r"shard is \(3, 4\).*gradient's \(6, 4\)"):
            adamw([p], lr=1e-2).step()
