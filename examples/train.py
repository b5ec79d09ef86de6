"""Train a model under a CFP plan with DTensor.

    torchrun --nproc-per-node 2 examples/train.py --plan plan.json [--steps N] [--lr LR] [--meta]

or, without a plan file, a plan built here from one config name for every block
(each rank analyses the model itself, before the process group starts):

    torchrun --nproc-per-node 2 examples/train.py --model gpt:tiny --mesh 2 --config-all batch

gloo on CPU, NCCL on GPUs (one per rank). The model is built from the plan's
model spec, parallelised with ``cfp.parallelize`` and trained with AdamW on a
synthetic next-token task: every sequence counts up modulo a small period
from a random start, so the next token is always learnable and the loss
falls. Rank 0 logs the loss and step time of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import cfp
from cfp.errors import CFPError
from cfp.optim import adamw
from cfp.parallelize import parallelize, plan_from_choice, spec_of


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", help="plan.json made by `cfp plan`")
    ap.add_argument("--model", help="model spec, without --plan (e.g. gpt:tiny)")
    ap.add_argument("--batch", type=int, default=None, help="with --model: batch size")
    ap.add_argument("--mesh", default=None, help="with --model: mesh, e.g. 2 (default: the world size)")
    ap.add_argument(
        "--config-all",
        default="batch",
        help="with --model: the config every block takes where it has it (else its first)",
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--period", type=int, default=16, help="period of the synthetic token pattern")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="rank 0 writes the loss curve here")
    ap.add_argument("--interpreted", action="store_true", help="run the plan on the DTensor interpreter, not lowered")
    ap.add_argument(
        "--compile",
        action="store_true",
        default=None,  # unset: as the plan was profiled (cfp plan --compile)
        help="compile the lowered programs with inductor (default: if the plan was made with cfp plan --compile)",
    )
    ap.add_argument(
        "--meta",
        action="store_true",
        help="build the model on meta: each rank materialises only its shards, one module at a time",
    )
    return ap.parse_args(argv)


def in_memory_plan(args, world: int):
    """Analyse the model and choose ``--config-all`` per block (on the fake process group, before dist starts)."""
    from cfp.analyze import analyze
    from cfp.mesh import parse_mesh

    traced = cfp.capture(cfp.build(cfp.ModelSpec(args.model, batch=args.batch, device="meta")))
    graph = analyze(traced, parse_mesh(args.mesh or str(world)), workers=1)
    return plan_from_choice(graph, lambda block, names: args.config_all if args.config_all in names else names[0])


def synthetic_batch(inputs, period: int, gen: torch.Generator):
    """Inputs shaped like the example ones; ``(idx, targets)`` token pairs get a learnable pattern."""
    if len(inputs) == 2 and all(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in inputs):
        idx = inputs[0]
        b, s = idx.shape[0], idx.shape[-1]
        start = torch.randint(0, period, (b, 1), generator=gen)
        tokens = (start + torch.arange(s + 1)) % period
        return tokens[:, :s].reshape(idx.shape).contiguous().to(idx), tokens[:, 1:].reshape(
            inputs[1].shape
        ).contiguous().to(inputs[1])
    return inputs  # unknown inputs: learn the fixed example batch


def main(argv=None) -> int:
    try:
        return train(parse_args(argv))
    except CFPError as exc:  # every rank hits it alike (a bad plan, a bad spec): say it once, without tracebacks
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 1


def train(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.plan:
        plan = cfp.Plan.load(args.plan)
    elif args.model:
        plan = in_memory_plan(args, world)
    else:
        print("give --plan FILE or --model SPEC", file=sys.stderr)
        return 2
    size = 1
    for s in plan.mesh["shape"]:
        size *= s
    if size != world:
        print(f"the plan's mesh {plan.mesh['shape']} needs {size} ranks; this run has {world}", file=sys.stderr)
        return 2

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = f"cuda:{local_rank}" if cuda else "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")

    if args.meta:
        # No rank ever holds the whole model: its init (reset_parameters, then the model's own init passes
        # where it has them, as the example models do) runs one module at a time, from the seed build() uses.
        workload = cfp.build(spec_of(plan, device="meta"))
        passes = getattr(workload.model, "init_passes", None)
        model = parallelize(
            workload.model,
            plan,
            init_fn=passes() if passes else None,
            seed=0,
            lowered=not args.interpreted,
            compile=args.compile,
        )
        # The batch's shapes only: synthetic_batch fills token inputs (other inputs train on these zeros).
        inputs = tuple(
            torch.zeros_like(t, device=device) if isinstance(t, torch.Tensor) else t for t in workload.inputs
        )
        workload = cfp.Workload(workload.spec, workload.model, inputs)
    else:
        workload = cfp.build(spec_of(plan, device=device))  # every rank builds the same (seeded) weights
        model = parallelize(
            workload.model, plan, example_inputs=workload.inputs, lowered=not args.interpreted, compile=args.compile
        )
    opt = adamw(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)  # the same global batch on every rank
    if rank == 0:
        counts = ", ".join(f"{k} x{v}" for k, v in plan.config_counts().items())
        print(
            f"{plan.model['spec'].get('describe', '')} on mesh {plan.mesh['shape']} ({'nccl' if cuda else 'gloo'}); "
            f"configs: {counts}",
            flush=True,
        )
    curve = []
    for step in range(args.steps):
        inputs = tuple(
            t.to(device) if isinstance(t, torch.Tensor) else t
            for t in synthetic_batch(workload.inputs, args.period, gen)
        )
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(*inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        curve.append({"step": step, "loss": loss.item(), "step_s": seconds})
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  {seconds * 1e3:8.1f} ms", flush=True)
    if rank == 0:
        first, last = curve[0]["loss"], curve[-1]["loss"]
        times = sorted(c["step_s"] for c in curve[1:]) or [curve[0]["step_s"]]
        print(f"loss {first:.4f} -> {last:.4f}; median step {times[len(times) // 2] * 1e3:.1f} ms", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(curve, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
