"""The plan file (cfp.plan), `cfp plan` and `cfp report`."""

import json

import pytest

import cfp
from cfp.cli import main
from cfp.cluster import AlphaBeta, ClusterModel
from cfp.pipeline import make_plan, parse_bytes
from cfp.plan import SCHEMA_VERSION, Plan

GiB = 2**30


def h100():
    intra = {
        k: AlphaBeta(10e-6, 1 / 360e9)
        for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
    }
    return ClusterModel(
        "test-h100", "H100", {"float32": 60e12, "bfloat16": 990e12}, 3.35e12, 80 * GiB, 8, intra, dict(intra)
    )


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    spec = cfp.ModelSpec("gpt:tiny", device="meta", args={"n_layer": 1})
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan, graph, solution = make_plan(spec, "2", memory="1GiB", cost="analytic", cluster=h100(), output=path)
    return plan, graph, path


def test_plan_contents(planned):
    plan, graph, path = planned
    data = json.loads(path.read_text())
    for key in (
        "schema_version",
        "model",
        "mesh",
        "parameters",
        "blocks",
        "predicted_step_time_s",
        "memory_per_device_bytes",
        "solve",
        "provenance",
    ):
        assert key in data
    assert data["mesh"] == {"shape": [2], "names": ["tp"]}
    traced = graph.traced
    # Every parameter, tied aliases and LayerNorm weights included.
    expected = set(traced.params.values()) | set(traced.aliases)
    assert set(data["parameters"]) == expected
    assert "transformer.wte.weight" in data["parameters"] and "transformer.h.0.ln_1.weight" in data["parameters"]
    assert data["parameters"]["transformer.wte.weight"] == data["parameters"]["lm_head.weight"]
    assert all(len(p) == 1 and p[0] in ("Replicate()", "Shard(0)", "Shard(1)") for p in data["parameters"].values())
    assert len(data["blocks"]) == len(graph.blocks)
    total = sum(b["time_s"] + b["transition_in_s"] for b in data["blocks"])
    assert data["predicted_step_time_s"] == pytest.approx(total)
    mem = data["memory_per_device_bytes"]
    # the step's peak: gradients (end of backward) or saved activations and the gradients in flight (start of
    # backward), whichever is larger
    peak = mem["params"] + mem["optimizer"] + mem["transient"]
    peak += max(mem["grads"] + mem["bucket"], mem["activations"] + mem["in_flight"])
    assert mem["total"] == peak <= mem["limit"] == GiB
    assert data["solve"]["status"] == "OPTIMAL" and data["solve"]["gap"] == 0
    assert data["provenance"]["cost_model"] == "analytic" and data["provenance"]["cluster"] == "test-h100"
    assert (
        "dp" in data["baselines"]
        and data["baselines"]["dp"]["predicted_step_time_s"] >= data["predicted_step_time_s"] - 1e-12
    )


def test_roundtrip_and_fingerprint(planned, tmp_path):
    plan, graph, path = planned
    loaded = Plan.load(path)
    assert loaded.to_json() == plan.to_json()
    loaded.check_matches(graph.traced)
    other = cfp.capture(cfp.build(cfp.ModelSpec("gpt:tiny", device="meta", args={"n_layer": 1}, batch=4)))
    with pytest.raises(cfp.CFPError, match="different model"):
        loaded.check_matches(other)


def test_bad_plan_files(planned, tmp_path):
    plan, graph, path = planned
    data = json.loads(path.read_text())
    bad = tmp_path / "v99.json"
    bad.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(cfp.CFPError, match=f"schema version 99.*reads version {SCHEMA_VERSION}"):
        Plan.load(bad)
    cut = tmp_path / "cut.json"
    cut.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(cfp.CFPError, match="damaged"):
        Plan.load(cut)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in data.items() if k != "parameters"}))
    with pytest.raises(cfp.CFPError, match="lacks parameters"):
        Plan.load(missing)
    with pytest.raises(cfp.CFPError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


def test_parse_bytes():
    assert parse_bytes("40GiB") == 40 * GiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5TiB") == int(1.5 * 2**40)
    assert parse_bytes("1000") == 1000
    with pytest.raises(cfp.CFPError, match="not a size"):
        parse_bytes("lots")


def test_cli_plan_and_report(tmp_path, capsys):
    cluster = tmp_path / "c.json"
    h100().save(cluster)
    out, js, png = tmp_path / "p.json", tmp_path / "r.json", tmp_path / "p.png"
    argv = [
        "plan",
        "gpt:tiny",
        "--arg",
        "n_layer=1",
        "--mesh",
        "2",
        "--cost",
        "analytic",
        "--cluster",
        str(cluster),
        "--tie-segments",
        "-o",
        str(out),
        "--json",
        str(js),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dp baseline" in text and "OPTIMAL" in text
    assert Plan.load(out).solve["tie_segments"] is True
    assert json.loads(js.read_text())["output"] == str(out)
    assert main(["report", str(out), "--png", str(png)]) == 0
    assert png.stat().st_size > 10_000
    assert "blocks along the model" in capsys.readouterr().out
    # An impossible memory limit is a one-paragraph error, not a traceback.
    assert main(argv[:-4] + ["--memory", "1KiB", "-o", str(out)]) == 1
    assert "least memory any plan needs" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("model", ["gpt:tiny", "llama:tiny", "moe:tiny"])
def test_plan_every_example_on_two_real_ranks(model, tmp_path, monkeypatch):
    """The README's main job, on each example: real gloo profiling, ILP, plan file."""
    monkeypatch.setenv("CFP_PROFILE_DIR", str(tmp_path / "store"))
    out = tmp_path / "plan.json"
    # --validate 0: the ILP's own plan (tests/test_validate.py covers validation)
    argv = ["plan", model, "--mesh", "2", "--backend", "real", "--cluster", "cpu-gloo-local", "--validate", "0"]
    assert main([*argv, "-o", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.solve["status"] == "OPTIMAL"
    assert plan.predicted_step_time_s > 0
    assert plan.provenance["backend"] == "real"
    traced = cfp.capture(cfp.build(cfp.ModelSpec(model, device="meta")))
    plan.check_matches(traced)
    assert set(plan.parameters) >= set(traced.params.values())


def test_compile_plans_on_compiled_profiles_and_trains_compiled(tmp_path, monkeypatch, capsys):
    """`cfp plan --compile`: every profile row times the inductor-compiled programs, the plan records it, and
    `cfp.parallelize` then compiles by default (as profiled), unless told otherwise or interpreting."""
    import pandas as pd

    from cfp.mesh import fake_mesh, parse_mesh
    from cfp.parallelize import parallelize

    monkeypatch.setenv("CFP_PROFILE_DIR", str(tmp_path / "store"))
    out = tmp_path / "plan.json"
    argv = ["plan", "tests/faults.py:build", "--mesh", "2", "--backend", "real", "--validate", "0", "--compile"]
    assert main([*argv, "-o", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.provenance["runtime"] == "compiled"
    rows = pd.concat(pd.read_parquet(p) for p in (tmp_path / "store" / "blocks").glob("*.parquet"))
    assert set(rows["runtime"]) == {"compiled"} and len(rows) == plan.provenance["profile_jobs"]
    with fake_mesh(parse_mesh("2")) as mesh:
        w = cfp.build(cfp.ModelSpec("tests/faults.py:build"))
        assert parallelize(w.model, plan, mesh=mesh, example_inputs=w.inputs)._lowered.compile
        assert not parallelize(w.model, plan, mesh=mesh, example_inputs=w.inputs, compile=False)._lowered.compile
        assert parallelize(w.model, plan, mesh=mesh, example_inputs=w.inputs, lowered=False)._lowered is None
    # nothing compiled to profile where nothing runs on this machine
    with pytest.raises(cfp.CFPError, match="needs --cost profiled --backend real"):
        make_plan("tests/faults.py:build", "2", cost="analytic", cluster=h100(), compile=True)
    argv = ["profile", "tests/faults.py:build", "--mesh", "2", "--backend", "emulated", "--cluster", "cpu-gloo-local"]
    capsys.readouterr()
    assert main([*argv, "--compile"]) == 1
    assert "--compile times programs compiled by inductor" in " ".join(capsys.readouterr().out.split())
