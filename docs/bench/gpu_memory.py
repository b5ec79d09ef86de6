"""One training step of the plain model on the GPU: the allocator's peak (less what the process held before
the step besides the model's own state, as `cfp bench` counts a plan's) beside MemTracker's peak by category.
Run by docs/bench/gpu.sh; writes to stdout."""

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from cfp.bench import _single_context, resident_bytes, train_step
from cfp.spec import ModelSpec

for spec, batch in [("gpt:gpt2", 8), ("gpt:small", 8)]:
    ctx = _single_context(ModelSpec(spec, batch=batch, device="cuda"), 1e-3, 1)
    for _ in range(2):
        train_step(ctx, 0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    own = resident_bytes(ctx.models[0], ctx.optimizers[0])
    torch.cuda.reset_peak_memory_stats()
    train_step(ctx, 0)
    alloc = torch.cuda.max_memory_allocated() - before + own
    tracker = MemTracker()
    tracker.track_external(ctx.models[0], ctx.optimizers[0])
    with tracker:
        train_step(ctx, 0)
    peak = tracker.get_tracker_snapshot("peak")
    gib = 2**30
    print(
        f"{spec} b{batch}: allocator peak (own) {alloc / gib:.3f} GiB, "
        f"before-step {before / gib:.3f}, own {own / gib:.3f}"
    )
    for dev, cats in peak.items():
        print("  memtracker", dev, {k: round(v / gib, 3) for k, v in cats.items()})
    del ctx
    torch.cuda.empty_cache()
