"""cfp plan --validate: the best predicted plans and the baselines in real training steps, the fastest written."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import cfp
from cfp import baselines
from cfp.cli import main
from cfp.cluster import load_cluster
from cfp.correction import FEATURE_SET, STEP_RUNTIME, CorrectedCosts, Correction, ValidationStore, features
from cfp.costs import CostSetup
from cfp.mesh import parse_mesh
from cfp.parallelize import config_indices
from cfp.pipeline import cost_model, make_plan
from cfp.plan import Plan
from cfp.profile import analyze_for_profile
from cfp.profile.store import SCHEMA, StoreWarning
from cfp.solve import evaluate, solution_for
from cfp.validate import DEFAULT_K, MAX_STEPS, MIN_TIMED_S, default_k

SPEC = cfp.ModelSpec("gpt:tiny", device="cpu")
REAL = CostSetup(spec=SPEC, cluster=None, backend="real")  # profiled on this machine's gloo ranks


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """gpt:tiny on 2 real gloo ranks: its graph and its profiled costs (the store stays for the whole module)."""
    store = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CFP_PROFILE_DIR", str(store))
        graph = analyze_for_profile(SPEC, parse_mesh("2"))
        yield graph, cost_model(graph, "profiled", REAL), store


class Rigged:
    """Real profiles, but data parallel looks almost free: the ILP's first plan is truly slow.

    On gpt:tiny over gloo data parallel is ~3x slower than replicating (its gradient
    all-reduce outweighs the halved compute), and Megatron ~2x (cfp bench, docs/bench).
    """

    name = "rigged"

    def __init__(self, table):
        self.table = table

    def block_time(self, class_id, config):
        t = self.table.block_time(class_id, config)
        return t / 100 if config == "batch" else t

    def transition_time(self, key):
        return self.table.transition_time(key)

    def describe(self):
        return self.table.describe()


def test_validation_picks_the_truly_faster_plan(profiled, tmp_path, monkeypatch):
    graph, table, store = profiled
    monkeypatch.setenv("CFP_PROFILE_DIR", str(store))
    out = tmp_path / "plan.json"
    plan, _, solution = make_plan(
        SPEC,
        "2",
        cost="profiled",
        backend="real",
        graph=graph,
        costs=Rigged(table),
        validate=1,
        validate_steps=5,
        output=out,
    )
    v = plan.validation
    cands = {c["name"]: c for c in v["candidates"]}
    assert set(cands) >= {"cfp-1", "analytic", "dp", "megatron"}  # the analytic planner's plan is measured too
    assert "batch" in cands["cfp-1"]["configs"]  # the rigged ILP prefers data parallel
    assert v["chosen"] != "cfp-1"
    chosen = cands[v["chosen"]]
    assert chosen["chosen"] and sum(c["chosen"] for c in cands.values()) == 1
    assert chosen["measured_step_time_s"] < cands["cfp-1"]["measured_step_time_s"]
    assert chosen["predicted_step_time_s"] > cands["cfp-1"]["predicted_step_time_s"]  # it was mis-ranked
    measured = [c for c in cands.values() if c["measured_step_time_s"] is not None]
    assert chosen["measured_step_time_s"] == min(c["measured_step_time_s"] for c in measured)
    # The written plan is the chosen one, block by block.
    written = Plan.load(out)
    counts = " ".join(f"{c}x{n}" for c, n in written.config_counts().items())
    assert counts == chosen["configs"]
    assert written.validation == v and v["wall_s"] > 0
    # at least the 5 steps asked for, more for short steps: MIN_TIMED_S of the fastest predicted candidate
    fastest = min(c["predicted_step_time_s"] for c in measured)
    assert v["steps"] == max(5, min(MAX_STEPS, math.ceil(MIN_TIMED_S / fastest)))
    assert all(c["steps"] == v["steps"] for c in measured)
    assert (
        solution.choice
        != make_plan(SPEC, "2", cost="profiled", backend="real", graph=graph, costs=Rigged(table), validate=0)[2].choice
    )


def test_cli_validate_default_fields_and_report(profiled, tmp_path, monkeypatch, capsys):
    graph, table, store = profiled
    monkeypatch.setenv("CFP_PROFILE_DIR", str(store))
    assert default_k("profiled", "real", parse_mesh("2"), "cpu") == DEFAULT_K
    assert default_k("profiled", "emulated", parse_mesh("2"), "cpu") == 0
    assert default_k("analytic", "real", parse_mesh("2"), "cpu") == 0
    out = tmp_path / "plan.json"
    assert main(["plan", "gpt:tiny", "--mesh", "2", "--backend", "real", "--validate-steps", "3", "-o", str(out)]) == 0
    assert "validation:" in capsys.readouterr().out
    data = json.loads(out.read_text())
    v = data["validation"]
    assert 3 <= v["steps"] <= MAX_STEPS and v["warmup"] == 2 and v["wall_s"] > 0
    names = [c["name"] for c in v["candidates"]]
    assert names[:DEFAULT_K] == [f"cfp-{i}" for i in range(1, DEFAULT_K + 1)] and "dp" in names and "megatron" in names
    predicted = [c["predicted_step_time_s"] for c in v["candidates"][:DEFAULT_K]]
    assert predicted == sorted(predicted)
    for c in v["candidates"]:
        assert set(c) == {
            "name",
            "configs",
            "predicted_step_time_s",
            "measured_step_time_s",
            "iqr_step_time_s",
            "steps",
            "chosen",
            "why",
            "raw_predicted_step_time_s",
            "corrected_step_time_s",
        }
        assert c["why"]
        if c["measured_step_time_s"] is not None:
            assert c["measured_step_time_s"] > 0 and c["iqr_step_time_s"] >= 0 and c["steps"] == v["steps"]
    assert sum(c["chosen"] for c in v["candidates"]) == 1
    assert main(["report", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "validation:" in text and v["chosen"] in text
    assert ("after the correction" if v["correction"]["applied"] else "no correction from the") in text
    # The measurements are stored beside the profiles.
    fit = v["correction"]
    assert fit["pairs"] == sum(c["measured_step_time_s"] is not None for c in v["candidates"])
    # One run's pairs share its machine state: nothing shows a fit on them carries over to the next run.
    assert fit["runs"] == 1 and not fit["applied"] and fit["error_after"] == fit["error_before"]
    assert list((store / "validations").glob("part-*.parquet"))
    # So the next plan's costs are as profiled; two runs that agree correct them
    # (test_two_runs_that_agree_correct_the_costs_the_ilp_plans_with).
    costs = cost_model(graph, "profiled", REAL)
    assert isinstance(costs, CorrectedCosts) == fit["applied"]
    chosen = next(c for c in v["candidates"] if c["chosen"])
    choice = config_indices(graph, [b["config"] for b in data["blocks"]])
    assert evaluate(graph, costs, choice).total_s == pytest.approx(chosen["corrected_step_time_s"], rel=1e-6)
    raw = costs.raw if fit["applied"] else costs
    assert evaluate(graph, raw, choice).total_s == pytest.approx(chosen["raw_predicted_step_time_s"], rel=1e-9)
    # Analytic costs model another cluster: validating them here is refused.
    assert (
        main(
            [
                "plan",
                "gpt:tiny",
                "--mesh",
                "2",
                "--cost",
                "analytic",
                "--cluster",
                "cpu-gloo-local",
                "--validate",
                "2",
                "-o",
                str(out),
            ]
        )
        == 1
    )
    assert "--validate measures plans on this machine" in " ".join(capsys.readouterr().out.split())


def _pairs(rows):
    return pd.DataFrame({"features": [json.dumps(f) for f, _ in rows], "measured_s": [m for _, m in rows]})


def test_correction_fit():
    """One pair: one common scale, exact. Many pairs with per-config error: per-config scales learnt."""
    one = Correction.fit(_pairs([({"config:batch": 0.02, "transitions": 0.01}, 0.045)]))
    assert one.predict({"config:batch": 0.02, "transitions": 0.01}) == pytest.approx(0.045, rel=1e-6)
    assert one.scales["config:batch"] == pytest.approx(one.scales["transitions"], rel=1e-3)
    assert Correction.fit(_pairs([])) is None
    rng = np.random.default_rng(0)
    truth = {"config:batch": 1.5, "config:col": 0.6, "transitions": 1.0}
    rows = []
    for _ in range(12):
        f = {k: float(rng.uniform(0.01, 0.1)) for k in truth}
        rows.append((f, sum(truth[k] * v for k, v in f.items()) + 0.005))
    fit = Correction.fit(_pairs(rows))
    before = max(abs(sum(f.values()) / m - 1) for f, m in rows)
    after = max(abs(fit.predict(f) / m - 1) for f, m in rows)
    assert before > 0.15 and after < 0.05, (before, after)
    assert fit.scales["config:batch"] > fit.scales["config:col"]


def test_a_correction_is_used_only_where_it_predicts_held_out_pairs():
    rng = np.random.default_rng(0)
    truth = {"config:batch": 1.5, "config:col": 0.6, "transitions": 1.0}
    structured, noise = [], []
    for _ in range(12):
        f = {k: float(rng.uniform(0.01, 0.1)) for k in truth}
        structured.append((f, sum(truth[k] * v for k, v in f.items())))
        noise.append((f, sum(f.values()) * float(rng.uniform(0.7, 1.3))))  # the profiles are right, on average
    fit = Correction.choose(_pairs(structured))
    assert fit is not None and fit.held_out_error < 0.9 * fit.uncorrected_error
    assert fit.scales["config:batch"] > fit.scales["config:col"]
    assert Correction.choose(_pairs(noise)) is None
    assert Correction.choose(_pairs(structured[:1])) is None  # nothing to hold out: nothing shows it carries over


def test_per_config_scales_must_predict_another_validation_run():
    """Pairs of one run share its machine state: no fit on them is trusted, not even a common scale; two runs
    that agree earn per-config scales, two that disagree at most a common scale, and two whose machines ran at
    different speeds nothing."""
    rng = np.random.default_rng(1)
    truth = {"config:batch": 1.8, "config:col": 0.9, "transitions": 1.3}  # all slower than profiled

    def run(name, scale):
        rows = []
        for _ in range(6):
            f = {k: float(rng.uniform(0.01, 0.1)) for k in truth}
            rows.append((f, sum(scale[k] * v for k, v in f.items())))
        return _pairs(rows).assign(run=name)

    assert Correction.choose(run("a", truth)) is None
    two = Correction.choose(pd.concat([run("a", truth), run("b", truth)], ignore_index=True))
    assert two.scales["config:batch"] > 1.5 * two.scales["config:col"]
    flipped = {"config:batch": 0.9, "config:col": 1.8, "transitions": 1.3}  # each run's noise, opposite ways
    noisy = Correction.choose(pd.concat([run("a", truth), run("b", flipped)], ignore_index=True))
    assert noisy is not None and noisy.scales == {} and noisy.scale > 1.2  # a common scale: both runs were slower
    faster = {k: 0.7 for k in truth}  # a run on a machine faster than profiled, the other slower
    assert Correction.choose(pd.concat([run("a", truth), run("b", faster)], ignore_index=True)) is None


def test_two_runs_that_agree_correct_the_costs_the_ilp_plans_with(profiled, tmp_path):
    """Stored pairs of two validation runs, both measuring 1.5x the profiles: the profiled cost model comes back
    corrected by that scale; one run alone leaves it as profiled."""
    from cfp.correction import corrected, store_key

    graph, costs, _ = profiled
    table = costs.raw if isinstance(costs, CorrectedCosts) else costs
    store, key = ValidationStore(tmp_path), store_key(graph, "real", "cpu")
    plans = [{"config:batch": 0.004 * (1 + i), "transitions": 0.001 * (3 - i)} for i in range(3)]
    for run in range(2):
        store.add(
            [
                {**key, "plan": f"cfp-{i}", "features": json.dumps(f), "measured_s": 1.5 * sum(f.values())}
                for i, f in enumerate(plans)
            ]
        )
        fitted = corrected(table, graph, "real", "cpu", store=tmp_path)
        assert (fitted is table) == (run == 0)
    assert isinstance(fitted, CorrectedCosts) and fitted.correction.runs == 2
    assert fitted.correction.scale == pytest.approx(1.5, rel=0.05)
    class_id = graph.class_of(graph.blocks[0])
    config = graph.block_strategies(graph.blocks[0])[0].config.name
    t, raw = fitted.block_time(class_id, config), table.block_time(class_id, config)
    assert t == pytest.approx(raw * fitted.correction.scale_of(f"config:{config}") + fitted.per_block_s, rel=1e-9)


def test_validation_store_keys_and_damaged_parts(tmp_path):
    store = ValidationStore(tmp_path)
    old = {"fingerprint": "f1", "mesh": "2", "backend": "real", "device_kind": "cpu", "torch_version": "2.13.0+cpu"}
    key = {**old, "schema": SCHEMA, "step_runtime": STEP_RUNTIME, "feature_set": FEATURE_SET}
    store.add([{**key, "plan": "cfp-1", "features": json.dumps({"transitions": 0.01}), "measured_s": 0.02}])
    store.add(
        [{**key, "fingerprint": "f2", "plan": "dp", "features": json.dumps({"transitions": 0.01}), "measured_s": 0.03}]
    )
    store.add([{**key, "schema": SCHEMA - 1, "plan": "dp", "features": "{}", "measured_s": 0.04}])  # other profiles
    store.add(
        [{**key, "step_runtime": STEP_RUNTIME - 1, "plan": "dp", "features": "{}", "measured_s": 0.06}]
    )  # other steps
    store.add([{**old, "plan": "dp", "features": "{}", "measured_s": 0.05}])  # from before the schema was kept
    store.add(  # split into features otherwise (fsdp's ZeRO collectives were missing from them)
        [{**key, "feature_set": FEATURE_SET - 1, "plan": "fsdp", "features": "{}", "measured_s": 0.07}]
    )
    (store.dir / "part-0-0.parquet").write_bytes(b"not parquet")
    with pytest.warns(StoreWarning, match="cannot be read"):
        rows = store.rows(key)
    assert list(rows["measured_s"]) == [0.02]
    assert Correction.fit(rows).predict({"transitions": 0.01}) == pytest.approx(0.02, rel=1e-6)


def test_features_split_a_zero3_and_recomputing_plan_whole_and_are_scaled_back():
    """What a validation stores sums to the plan's prediction (fsdp's gathers and recomputation included), and a
    correction's per-feature scales reach the ILP's storage and recomputation deltas."""
    graph = analyze_for_profile(SPEC, parse_mesh("2"))
    costs = cost_model(
        graph, "analytic", CostSetup(spec=SPEC, cluster=load_cluster("cpu-gloo-local"), backend="emulated")
    )
    choice = baselines.choose("fsdp", graph)
    levels = baselines.storage_levels("fsdp", graph, choice)
    recompute = [True] * len(choice)
    fsdp = solution_for(graph, costs, choice, "baseline fsdp", storage=levels, recompute=recompute)
    feats = features(graph, costs, fsdp)
    assert feats["storage:zero3"] > 0 and feats["recompute"] > 0
    assert sum(feats.values()) == pytest.approx(fsdp.evaluation.total_s, rel=1e-9)
    plain = evaluate(graph, costs, choice)
    assert sum(v for f, v in feats.items() if f.startswith("config:") or f == "transitions") == pytest.approx(
        plain.total_s, rel=1e-9
    )
    scales = {"storage:zero3": 2.0, "recompute": 3.0}
    fixed = CorrectedCosts(costs, Correction(scale=1.0, scales=scales), len(graph.blocks))
    corrected = evaluate(graph, fixed, choice, storage=levels, recompute=recompute).total_s
    expected = plain.total_s + 2.0 * feats["storage:zero3"] + 3.0 * feats["recompute"]
    assert corrected == pytest.approx(expected, rel=1e-9)
