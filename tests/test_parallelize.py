"""cfp.parallelize: a plan applied with DTensor computes the single-device model's loss,
gradients and optimizer step, on a real 2-rank gloo group, both lowered to local programs
(the default) and interpreted on DTensors.

Plans are made in this process (analysis runs over the fake process group);
one spawn of two ranks then checks every (model, plan, path) triple.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import pytest
import torch
from parity import close, gradient_errors
from ranks import run_ranks
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode

import cfp
from cfp import baselines
from cfp.analyze import analyze
from cfp.baselines import BASELINES
from cfp.mesh import parse_mesh
from cfp.parallelize import parallelize, plan_from_choice, plan_from_indices
from cfp.pipeline import make_plan
from cfp.storage import LEVELS

MODELS = ["gpt:tiny", "llama:tiny", "moe:tiny"]
BATCH = 2
LR = 1e-2
# Adam's first step is lr * g / (|g| + eps): with the default eps (1e-8) a gradient near zero
# turns a 1e-8 rounding difference into an lr-sized one. A larger eps keeps the check meaningful.
ADAM_EPS = 1e-4
TIMEOUT_S = 600


def random_choice(seed):
    rng = random.Random(seed)
    return lambda block, names: rng.choice(names)


def storage_plans(graph, rng) -> dict:
    """Every block's parameters stored at one ZeRO level (on data-parallel configs), every block
    recomputed, and a random mix of configs, levels and recomputation."""
    dp = baselines.dp(graph)
    n = len(graph.blocks)
    out = {level: plan_from_indices(graph, dp, [level] * n) for level in LEVELS[1:]}
    out["recompute"] = plan_from_indices(graph, dp, recompute=[True] * n)
    mixed = [rng.randrange(len(graph.block_strategies(b))) for b in graph.blocks]
    out["mixed-storage"] = plan_from_indices(
        graph, mixed, [rng.choice(LEVELS) for _ in range(n)], [rng.random() < 0.5 for _ in range(n)]
    )
    return out


def spec(model):
    return cfp.ModelSpec(model, batch=BATCH, device="cpu")


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """{model: {plan name: plan file}}: CFP's plan, every baseline that applies, and a random mix."""
    root = tmp_path_factory.mktemp("plans")
    out = {}
    for i, model in enumerate(MODELS):
        traced = cfp.capture(cfp.build(spec(model)))
        graph = analyze(traced, parse_mesh("2"))
        made = {"random": plan_from_choice(graph, random_choice(1234 + i))}
        for name in [None, *BASELINES]:
            if name is None or baselines.choose(name, graph) is not None:
                made[name or "cfp"] = make_plan(
                    traced, "2", cost="analytic", cluster="cpu-gloo-local", graph=graph, baseline=name
                )[0]
        made.update(storage_plans(graph, random.Random(99 + i)))
        out[model] = {}
        for name, plan in made.items():
            path = root / f"{model.replace(':', '_')}-{name}.json"
            plan.save(path)
            out[model][name] = str(path)
    return out


def _reference(model_spec):
    """Loss, gradients and parameters after one SGD step and after one Adam step, on one device."""
    ref = {}
    for opt_name in ("sgd", "adam"):
        w = cfp.build(model_spec)
        loss = w.model(*w.inputs)
        loss.backward()
        params = dict(w.model.named_parameters(remove_duplicate=False))
        grads = {k: p.grad.detach().clone() for k, p in params.items()}
        opt = (
            torch.optim.SGD(w.model.parameters(), lr=LR)
            if opt_name == "sgd"
            else torch.optim.Adam(w.model.parameters(), lr=LR, eps=ADAM_EPS)
        )
        opt.step()
        ref[opt_name] = {k: p.detach().clone() for k, p in params.items()}
        ref["loss"], ref["grads"] = loss.detach(), grads
    return ref


class DTensorOps(TorchDispatchMode):
    """The ops dispatched with a DTensor operand."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _check(model, plan_name, plan_file, ref, opt_name, lowered, compile=False) -> tuple[list[str], dict]:
    from torch.distributed.tensor import Shard, distribute_tensor

    errors, stats = [], {"loss_diff": 0.0, "grad_diff": 0.0, "param_diff": 0.0}
    w = cfp.build(spec(model))
    if plan_name == "random":  # example inputs from the plan's model spec
        pm = parallelize(w.model, plan_file, lowered=lowered, compile=compile)
    else:
        pm = parallelize(w.model, plan_file, example_inputs=w.inputs, lowered=lowered, compile=compile)
    stats["configs"] = cfp.Plan.load(plan_file).config_counts()
    stats["stored_sharded"] = sum(1 for p in pm.parameters() if any(s.is_shard() for s in p.placements))
    stats["checkpoint_regions"] = sum(step.recompute for step in pm._schedule.steps)
    inputs = w.inputs
    if plan_name == "megatron":  # DTensor inputs are accepted (and redistributed per the plan)
        inputs = tuple(distribute_tensor(t, pm.mesh, [Shard(0)]) for t in inputs)
    loss = pm(*inputs)
    stats["fallbacks"] = sorted(set(pm.fallbacks))
    if isinstance(loss, torch.distributed.tensor.DTensor):
        errors.append("the loss is a DTensor, not a plain tensor")
    ok, stats["loss_diff"] = close(loss.detach(), ref["loss"])
    if not ok:
        errors.append(f"loss {loss.item()} != {ref['loss'].item()}")
    loss.backward()
    params = dict(pm.named_parameters(remove_duplicate=False))
    errors += gradient_errors(params, ref["grads"], stats)
    opt = (
        torch.optim.SGD(pm.parameters(), lr=LR)
        if opt_name == "sgd"
        else torch.optim.Adam(pm.parameters(), lr=LR, eps=ADAM_EPS, fused=True)  # fused, as cfp.optim.adamw
    )
    opt.step()
    for fqn, p in params.items():
        ok, diff = close(p.detach().full_tensor(), ref[opt_name][fqn])
        stats["param_diff"] = max(stats["param_diff"], diff)
        if not ok:
            errors.append(f"{fqn}: after a {opt_name} step the parameter differs by {diff:.3g}")
    if pm.lowered != lowered:
        errors.append(f"lowered={pm.lowered}, asked for lowered={lowered}")
    if pm.lowered:  # a second step runs the lowered programs: no DTensor op is dispatched in it
        opt.zero_grad(set_to_none=True)
        with DTensorOps() as seen:
            pm(*inputs).backward()
        # ... but autograd's AccumulateGrad, which detaches each parameter's gradient as it stores it
        ops = [op for op in seen.ops if op != "aten.detach.default"]
        if ops or len(seen.ops) > len(params):
            errors.append(f"the lowered step dispatched {len(seen.ops)} DTensor ops: {sorted(set(seen.ops))[:5]}")
    return errors, stats


def _worker(rank: int, world: int, port: int, plans: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    results = {}
    try:
        for model, files in plans.items():
            ref = _reference(spec(model))
            for i, (name, plan_file) in enumerate(sorted(files.items())):
                for lowered in (True, False):
                    opt_name = "adam" if (i + lowered) % 2 else "sgd"  # each plan steps both, one per path
                    key = f"{model} {name} {'lowered' if lowered else 'interpreted'}"
                    print(f"rank {rank}: {key}", file=sys.stderr, flush=True)  # a rank that crashes says in what
                    start = time.perf_counter()
                    try:
                        errors, stats = _check(model, name, plan_file, ref, opt_name, lowered)
                    except Exception as exc:  # reported, not hung: the other rank fails at the same op
                        errors, stats = [f"{type(exc).__name__}: {exc}"], {}
                    stats.update(seconds=round(time.perf_counter() - start, 2), optimizer=opt_name)
                    results[key] = {
                        "errors": errors,
                        "stats": stats,
                    }
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()


def test_plans_match_single_device(plans, tmp_path):
    """Loss, every gradient (with the parameter's placements) and one SGD/Adam step match one device."""
    world = 2
    run_ranks(_worker, (plans, str(tmp_path)), TIMEOUT_S, world)
    problems = []
    for r in range(world):
        results = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert len(results) == 2 * sum(len(f) for f in plans.values())
        for key, res in results.items():
            print(f"rank {r} {key}: {res['stats']}")
            if " random " in key and "configs" in res["stats"]:
                assert len(res["stats"]["configs"]) >= 2, f"{key} is not a mixed plan: {res['stats']['configs']}"
            if key.split()[1] in ("zero1", "zero2", "zero3", "fsdp") and not res["errors"]:
                assert res["stats"]["stored_sharded"] > 0, f"{key} stores no parameter sharded"
            if key.split()[1] == "recompute" and not res["errors"]:
                assert res["stats"]["checkpoint_regions"] > 0, f"{key} recomputes nothing"
            problems += [f"rank {r} {key}: {e}" for e in res["errors"]]
    assert not problems, "\n".join(problems[:30])


def test_megatron_plan_shards_weights(plans):
    """The Megatron plan really is tensor parallel: QKV column-, output projection row-sharded."""
    plan = cfp.Plan.load(plans["gpt:tiny"]["megatron"])
    assert plan.parameters["transformer.h.0.attn.c_attn.weight"] == (Shard(0),)
    assert plan.parameters["transformer.h.0.attn.c_proj.weight"] == (Shard(1),)
    assert plan.parameters["transformer.h.0.mlp.c_fc.weight"] == (Shard(0),)
    assert plan.parameters["transformer.h.0.mlp.c_proj.weight"] == (Shard(1),)
    dp = cfp.Plan.load(plans["gpt:tiny"]["dp"])
    assert all(p == (Replicate(),) for p in dp.parameters.values())


def test_baselines_that_apply(plans):
    """Megatron applies to GPT and LLaMA (LLaMA's untied head is vocabulary parallel), expert parallelism to MoE."""
    storage = {"zero1", "zero2", "zero3", "recompute", "mixed-storage"}
    assert set(plans["gpt:tiny"]) == {"cfp", "dp", "megatron", "fsdp", "fsdp+tp", "random"} | storage
    assert set(plans["moe:tiny"]) == {"cfp", "dp", "megatron", "expert", "fsdp", "fsdp+tp", "random"} | storage
    llama = cfp.Plan.load(plans["llama:tiny"]["megatron"])
    assert llama.parameters["output.weight"] == (Shard(0),)
    assert llama.parameters["layers.0.attention.wo.weight"] == (Shard(1),)
    gpt = cfp.Plan.load(plans["gpt:tiny"]["megatron"])
    assert gpt.parameters["lm_head.weight"] == (Replicate(),)  # tied to the embedding
    moe = cfp.Plan.load(plans["moe:tiny"]["expert"])
    assert moe.parameters["transformer.h.0.mlp.w_in"] == (Shard(0),)
    assert moe.parameters["transformer.h.0.attn.c_attn.weight"] == (Replicate(),)
    assert moe.config_counts().get("batch", 0) >= 6
    assert moe.solve["status"] == "baseline expert"


def test_fingerprint_mismatch_refused(plans):
    """A plan made for gpt:tiny is refused for llama:tiny, and for gpt:tiny with another batch."""
    w = cfp.build(spec("llama:tiny"))
    with pytest.raises(cfp.CFPError, match="different model"):
        parallelize(w.model, plans["gpt:tiny"]["dp"], example_inputs=w.inputs)
    w = cfp.build(cfp.ModelSpec("gpt:tiny", batch=4, device="cpu"))
    with pytest.raises(cfp.CFPError, match="fingerprint"):
        parallelize(w.model, plans["gpt:tiny"]["dp"], example_inputs=w.inputs)


def _compiled_worker(rank: int, world: int, port: int, plan_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    errors, stats = [], {}
    try:
        errors, stats = _check("gpt:tiny", "zero3", plan_file, _reference(spec("gpt:tiny")), "adam", True, compile=True)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"errors": errors, "stats": stats}, f)
        dist.destroy_process_group()


def test_compiled_zero3_plan_with_recomputed_blocks_matches_single_device(tmp_path):
    """Inductor compiles the lowered programs with the partitioner's recompute tags (ZeRO-3 regathers,
    recomputed blocks) and computes the single-device loss, gradients and Adam step."""
    graph = analyze(cfp.capture(cfp.build(spec("gpt:tiny"))), parse_mesh("2"))
    n = len(graph.blocks)
    plan = plan_from_indices(graph, baselines.dp(graph), ["zero3"] * n, [i % 2 == 0 for i in range(n)])
    plan_file = str(tmp_path / "plan.json")
    plan.save(plan_file)
    run_ranks(_compiled_worker, (plan_file, str(tmp_path)), TIMEOUT_S)
    for r in range(2):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert not result["errors"], result["errors"][:10]


NORMED_MLP = """
import torch
from torch import nn

class NormedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 1)

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.up(x)))).mean()

def build(batch=8, device="cpu", **kw):
    torch.manual_seed(0)
    with torch.device(device):
        return NormedMLP(), (torch.randn(batch, 8),)
"""


def _normed_mlp_worker(rank: int, world: int, port: int, spec, plans: dict, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ref = cfp.build(spec)
    ref.model(*ref.inputs)
    results = {}
    for name, plan in plans.items():
        for lowered in (True, False):
            w = cfp.build(spec)
            pm = parallelize(w.model, plan, example_inputs=w.inputs, lowered=lowered)
            pm(*w.inputs)
            stats = {k: close(v, ref.model.get_buffer(k))[0] for k, v in pm.model_buffers().items() if "running" in k}
            results[f"{name} lowered={lowered}"] = stats
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_running_statistics_entered_channel_sharded_are_written_back(tmp_path):
    """A column-parallel linear feeds BatchNorm1d channel-sharded, so the block takes the running statistics
    channel-sharded: the update lands on that copy and is written back, though batch norm's update moves no
    version counter (the write-back once looked for one, and the statistics stayed as they were)."""
    (tmp_path / "normed.py").write_text(NORMED_MLP)
    spec = cfp.ModelSpec(f"{tmp_path / 'normed.py'}:build", batch=8, device="cpu")
    graph = analyze(cfp.capture(cfp.build(spec)), parse_mesh("2"))
    col = plan_from_choice(graph, lambda block, names: "col" if "col" in names else names[0])
    assert "col" in col.config_counts()
    run_ranks(_normed_mlp_worker, (spec, {"col": col}, str(tmp_path)), TIMEOUT_S)
    results = json.loads((tmp_path / "rank0.json").read_text())
    assert results and all(all(stats.values()) and stats for stats in results.values()), results
