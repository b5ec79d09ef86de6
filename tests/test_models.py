"""Models from the ecosystem (tests/models_matrix.py) plan and train under their plans.

For every model of the matrix, one spawn of two gloo ranks, launched as ``torchrun`` would:

- profiles it on the real backend and makes CFP's plan (``cfp plan MODEL --mesh 2 --backend real``
  under torchrun: the same ``make_plan`` and ``profile`` code, rank 0's store and solution);
- applies that plan, ``dp``, ``megatron`` where it applies and a random mixed plan with
  ``cfp.parallelize``, and checks that the loss, every gradient (placed like its parameter), the
  buffers after the forward (BatchNorm's running statistics) and one SGD step equal the
  single-device model's.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import traceback
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from models_matrix import MATRIX
from parity import close, gradient_errors
from ranks import run_ranks

import cfp
from cfp import baselines
from cfp.analyze import analyze
from cfp.errors import CFPWarning
from cfp.mesh import parse_mesh
from cfp.parallelize import parallelize, plan_from_choice, plan_from_indices
from cfp.pipeline import make_plan
from cfp.profile import analyze_for_profile, profile

MESH = "2"
LR = 1e-2
TIMEOUT_S = 900


def _reference(spec: cfp.ModelSpec) -> dict:
    """Loss, gradients, buffers after the forward and parameters after one SGD step, on one device."""
    w = cfp.build(spec)
    loss = w.model(*w.inputs)
    loss.backward()
    params = dict(w.model.named_parameters(remove_duplicate=False))
    ref = {"loss": loss.detach(), "grads": {k: p.grad.detach().clone() for k, p in params.items()}}
    ref["buffers"] = {k: b.detach().clone() for k, b in w.model.named_buffers()}
    torch.optim.SGD(w.model.parameters(), lr=LR).step()
    ref["params"] = {k: p.detach().clone() for k, p in params.items()}
    return ref


def _check(spec: cfp.ModelSpec, plan, traced, ref) -> tuple[list[str], dict]:
    errors, stats = [], {"configs": plan.config_counts()}
    w = cfp.build(spec)
    pm = parallelize(w.model, plan, example_inputs=w.inputs, traced=traced)
    loss = pm(*w.inputs)
    stats["fallbacks"] = sorted(set(pm.fallbacks))
    ok, stats["loss_diff"] = close(loss, ref["loss"])
    if not ok:
        errors.append(f"loss {loss.item()} != {ref['loss'].item()}")
    for fqn, value in pm.model_buffers().items():
        if fqn in ref["buffers"] and not close(value, ref["buffers"][fqn])[0]:
            errors.append(f"buffer {fqn} after the forward differs by {close(value, ref['buffers'][fqn])[1]:.3g}")
    loss.backward()
    params = dict(pm.named_parameters(remove_duplicate=False))
    errors += gradient_errors(params, ref["grads"], stats)
    torch.optim.SGD(pm.parameters(), lr=LR).step()
    for fqn, p in params.items():
        ok, diff = close(p.detach().full_tensor(), ref["params"][fqn])
        if not ok:
            errors.append(f"{fqn}: after an SGD step the parameter differs by {diff:.3g}")
    return errors, stats


def _plans(spec: cfp.ModelSpec, store: str, seed: int) -> tuple[dict, object, list[str]]:
    """CFP's plan from real profiles (rank 0's solution), the baselines that apply and a random mix, and the
    profiled programs that could not be lowered (timed on the interpreter instead)."""
    import torch.distributed as dist

    graph = analyze_for_profile(spec, parse_mesh(MESH))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CFPWarning)
        run = profile(graph, spec, "real", None, store, warmup=0, iters=1)
    unlowered = sorted({str(w.message)[:200] for w in caught if "could not be lowered" in str(w.message)})
    plan = make_plan(graph.traced, MESH, cost="profiled", backend="real", graph=graph, costs=run.table)[0]
    box = [plan]
    dist.broadcast_object_list(box, src=0)  # the ILP may break ties differently on each rank
    plans = {"cfp": box[0]}
    for name in ("dp", "megatron"):
        choice = baselines.choose(name, graph)
        if choice is not None:
            plans[name] = plan_from_indices(graph, choice)
    rng = random.Random(seed)  # among the configs that ran while profiled, as the ILP chooses

    def feasible(block, names):
        return [n for n in names if math.isfinite(run.table.block_time(graph.class_of(block), n))]

    plans["random"] = plan_from_choice(graph, lambda block, names: rng.choice(feasible(block, names)))
    return plans, graph, unlowered


def _worker(rank: int, world: int, port: int, names: list[str], out_dir: str, store: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    # As torchrun launches it: profiling then runs on this process group (cfp.profile.backends.TorchrunBackend).
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    results = {}
    try:
        for i, name in enumerate(names):
            spec = MATRIX[name]
            start = time.perf_counter()
            try:
                # Rank 0's store decides which jobs run; a store per rank keeps rank 1 from reading
                # (and renaming as corrupt) a file rank 0 is writing.
                plans, graph, unlowered = _plans(spec, os.path.join(store, f"rank{rank}"), seed=1234 + i)
            except Exception as exc:  # every rank fails alike (analysis and profiling are SPMD)
                results[name] = {"plan": {"errors": [f"planning: {type(exc).__name__}: {exc}"], "stats": {}}}
                continue
            seconds = round(time.perf_counter() - start, 2)
            results[name] = {"plan": {"errors": [], "stats": {"seconds": seconds, "unlowered": unlowered}}}
            ref = _reference(spec)
            for plan_name, plan in plans.items():
                start = time.perf_counter()
                try:
                    errors, stats = _check(spec, plan, graph.traced, ref)
                except Exception as exc:  # reported, not hung: the other rank fails at the same op
                    errors, stats = (
                        [f"{type(exc).__name__}: {str(exc)[:300]}"],
                        {"traceback": traceback.format_exc(limit=-4)},
                    )
                stats["seconds"] = round(time.perf_counter() - start, 2)
                results[name][plan_name] = {"errors": errors, "stats": stats}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{model: {"plan" or plan name: {"errors", "stats"}}} from rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("models")
    names = list(MATRIX)
    for name in names:  # analysis once here, on the shared on-disk cache, not once per rank
        analyze(cfp.capture(cfp.build(MATRIX[name])), parse_mesh(MESH))
    run_ranks(_worker, (names, str(out), str(out / "profiles")), TIMEOUT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("model", list(MATRIX))
def test_model_plans_and_trains(results, model):
    """A real-backend plan is made, and every plan trains as the single-device model does."""
    problems = []
    for rank, by_model in enumerate(results):
        assert model in by_model, f"rank {rank} never reached {model}"
        for plan_name, res in by_model[model].items():
            print(f"rank {rank} {model} {plan_name}: {res['stats']}")
            problems += [f"rank {rank} {plan_name}: {e}" for e in res["errors"]]
    assert not problems, "\n".join(problems[:20])
    assert {"plan", "cfp", "dp", "random"} <= set(results[0][model])
    # Every block program is profiled lowered, as the plan trains: none falls back to the interpreter (exits
    # that alias one another, strided shards' specs once did). Every model is profiled in the same process,
    # after the others: none may break lowering for the next (a mesh per profiling run once made AOTAutograd
    # reject every block of every later model).
    unlowered = results[0][model]["plan"]["stats"].get("unlowered", [])
    assert not unlowered, unlowered[:3]


def test_megatron_applies_by_parameter_names(results):
    """Projection names of transformers and torch.nn are recognised: Megatron shards every transformer."""
    for model in MATRIX:
        if model in ("convnet", "resnet"):  # no transformer: nothing for Megatron to shard
            assert "megatron" not in results[0][model]
            continue
        configs = results[0][model]["megatron"]["stats"]["configs"]
        assert configs.get("col", 0) >= 2 and configs.get("row", 0) >= 2, (model, configs)


class _Failing:
    """An analytic cost model under which some block configs failed while profiled."""

    def __init__(self, costs, failed: set[tuple[str, str]]):
        self.costs, self.failed, self.name = costs, failed, "profiled"

    def __getattr__(self, name):
        return getattr(self.costs, name)

    def block_time(self, class_id, config):
        return math.inf if (class_id, config) in self.failed else self.costs.block_time(class_id, config)

    def block_failure(self, class_id, config):
        return "failed: RuntimeError: no kernel" if (class_id, config) in self.failed else ""


def test_configs_that_failed_profiling_are_avoided_then_named():
    """The ILP avoids configs that failed while profiled; a block with none left is an error naming why."""
    from cfp.analytic import AnalyticCosts
    from cfp.cluster import load_cluster
    from cfp.solve import solve

    graph = analyze(cfp.capture(cfp.build(cfp.ModelSpec("gpt:tiny", batch=2, device="meta"))), parse_mesh(MESH))
    costs = AnalyticCosts(graph, load_cluster("cpu-gloo-local"))
    block = graph.blocks[1]
    names = [p.config.name for p in graph.block_strategies(block)]
    best = solve(graph, costs).choice[block.id]
    failed = {(graph.class_of(block), names[best])}
    assert solve(graph, _Failing(costs, failed)).choice[block.id] != best
    with pytest.raises(
        cfp.CFPError,
        match=rf"block {block.id} \({block.anchor}; ops .*embedding.*\) can run .*rep: failed: RuntimeError",
    ):
        solve(graph, _Failing(costs, {(graph.class_of(block), n) for n in names}))
