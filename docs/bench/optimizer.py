"""AdamW over DTensor parameters, side by side: torch's fused AdamW (its one call goes through DTensor's
dispatch) against cfp.optim.adamw (the same kernel on the local shards). gpt:small's parameters, replicated on
a 1-rank gloo group, one thread; median of 30 steps each, interleaved.

    python docs/bench/optimizer.py [PRESET]
"""

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

import cfp
from cfp.optim import adamw

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29561")
dist.init_process_group("gloo", rank=0, world_size=1)
torch.set_num_threads(1)
mesh = init_device_mesh("cpu", (1,))
model = cfp.build(cfp.ModelSpec(sys.argv[1] if len(sys.argv) > 1 else "gpt:small", device="cpu")).model


def parameters() -> list[torch.nn.Parameter]:
    params = [
        torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Replicate()])) for p in model.parameters()
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


optimizers = {
    "torch AdamW(fused=True)": torch.optim.AdamW(parameters(), lr=1e-3, fused=True),
    "cfp.optim.adamw": adamw(parameters(), lr=1e-3),
}
times = {name: [] for name in optimizers}
for i in range(33):
    for name, opt in optimizers.items():
        start = time.perf_counter()
        opt.step()
        if i >= 3:
            times[name].append(time.perf_counter() - start)
median = {name: statistics.median(ts) for name, ts in times.items()}
n = len(list(model.parameters()))
for name, m in median.items():
    print(f"{name:26s} {m * 1e3:6.2f} ms a step ({n} parameters)")
print(f"ratio: {median['torch AdamW(fused=True)'] / median['cfp.optim.adamw']:.2f}x")
dist.destroy_process_group()
