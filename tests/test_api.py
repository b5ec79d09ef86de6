"""The Python API mirrors the CLI, stage by stage, as the README shows."""

import inspect

import pytest

import cfp
from cfp.cli import main, parser
from cfp.cluster import load_cluster
from cfp.costs import COST_MODELS, CostSetup, register_cost_model


def test_stage_by_stage_api(tmp_path, monkeypatch):
    monkeypatch.setenv("CFP_PROFILE_DIR", str(tmp_path))
    workload = cfp.build(cfp.ModelSpec("gpt:tiny", device="meta", args={"n_layer": 1}))
    traced = cfp.capture(workload)
    graph = cfp.analyze(traced, "2")
    run = cfp.profile(graph, workload.spec, backend="emulated", cluster=load_cluster("h100-nvlink-8"))
    assert run.jobs > 0
    solution = cfp.solve(graph, run.table, memory_limit=40 * 2**30)
    assert solution.status == "OPTIMAL"
    assert solution.evaluation.total_s > 0


class FlatCosts:
    """A whole cost model in one class: every block config takes a millisecond, every transition a tenth."""

    name = "flat"

    def __init__(self, graph, setup: CostSetup):
        self.cluster = setup.cluster

    def block_time(self, class_id, config):
        return 1e-3

    def transition_time(self, key):
        return 0.0 if key.is_noop else 1e-4

    def describe(self):
        return {"backend": "none", "cluster": self.cluster.name}


@pytest.fixture
def flat():
    register_cost_model("flat")(FlatCosts)  # as `@register_cost_model("flat")` on the class would
    yield
    del COST_MODELS["flat"]


def test_a_registered_cost_model_plans_by_name(flat, tmp_path):
    """Registering one class makes it `cost="flat"` in the API and `--cost flat` in the CLI."""
    spec = cfp.ModelSpec("gpt:tiny", device="meta", args={"n_layer": 1})
    plan, graph, _ = cfp.make_plan(spec, "2", cost="flat", memory="1GiB")
    assert plan.provenance["cost_model"] == "flat" and plan.provenance["backend"] == "none"
    assert sum(b["time_s"] for b in plan.blocks) == pytest.approx(1e-3 * len(graph.blocks))
    plan_command = parser()._subparsers._group_actions[0].choices["plan"]
    cost = next(a for a in plan_command._actions if a.dest == "cost")
    assert "flat" in cost.choices and {"profiled", "analytic"} <= set(cost.choices)
    out = tmp_path / "plan.json"
    assert main(["plan", "gpt:tiny", "--arg", "n_layer=1", "--mesh", "2", "--cost", "flat", "-o", str(out)]) == 0
    assert cfp.Plan.load(out).provenance["cost_model"] == "flat"


def test_api_and_cli_default_alike():
    """`cfp plan` and `cfp.plan`, `cfp profile` and `cfp.profile`, take the same defaults (PlanOptions)."""
    args = parser().parse_args(["plan", "gpt:tiny", "--mesh", "2"])
    options = cfp.PlanOptions()
    assert (args.cost, args.backend, args.cluster, args.memory, args.baseline) == (
        options.cost,
        options.backend,
        options.cluster,
        options.memory,
        options.baseline,
    )
    assert (args.tie_segments, not args.no_storage_sharding, not args.no_recompute) == (
        options.tie_segments,
        options.storage,
        options.recompute,
    )
    assert (args.time_limit, args.validate, args.validate_steps) == (
        options.time_limit_s,
        options.validate,
        options.validate_steps,
    )
    assert options.cost == "profiled" and options.backend == "emulated"
    args = parser().parse_args(["profile", "gpt:tiny", "--mesh", "2"])
    assert args.backend == inspect.signature(cfp.profile).parameters["backend"].default == "real"
