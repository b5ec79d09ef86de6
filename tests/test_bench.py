"""cfp bench: every plan in real interleaved training steps on a 2-rank gloo group."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import cfp
from cfp.bench import COLUMNS, BenchPlan, resident_bytes, round_orders, summarize
from cfp.cli import main
from cfp.plan import Plan


def _plan(configs: list[str]) -> Plan:
    blocks = [{"config": c} for c in configs]
    return Plan(
        model={},
        mesh={"shape": [2], "names": ["d0"]},
        parameters={},
        blocks=blocks,
        predicted_step_time_s=0.0,
        time_breakdown_s={},
        memory_per_device_bytes={},
        solve={},
        provenance={},
    )


def test_resident_bytes_counts_a_plan_once():
    """On GPUs a plan's peak is the allocator's minus what the other plans hold: its own weights, gradients
    and optimizer state, tied weights once."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(10, 4)
    model = torch.nn.Sequential(embed, torch.nn.Linear(4, 10, bias=False))
    model[1].weight = embed.weight  # tied: one storage
    opt = torch.optim.AdamW(model.parameters())
    floats = 10 * 4 * 4
    assert resident_bytes(model, opt) == floats
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    # + the gradient, exp_avg and exp_avg_sq, + the 4-byte step count
    assert resident_bytes(model, opt) == 4 * floats + 4


def test_summary_columns_ratios_and_errors():
    plans = [
        BenchPlan("cfp", _plan(["rep", "col"]), 0.011, 0.001, 110),
        BenchPlan("dp", _plan(["batch", "batch"]), 0.03, 0.002, 150),
    ]

    def steps(xs):
        return [{"step_s": x, "fwd_bwd_s": x * 0.8, "optimizer_s": x * 0.2, "loss": 1.0} for x in xs]

    raw = {
        "cfp": {"steps": steps([0.010, 0.012, 0.009]), "peak_mem_bytes": 100, "first_loss": 5.5},
        "dp": {"steps": steps([0.020, 0.022, 0.040]), "peak_mem_bytes": 200, "first_loss": 5.5},
        "single": {"steps": steps([0.015, 0.016, 0.014]), "peak_mem_bytes": 300, "first_loss": 5.5},
    }
    table = summarize(plans, raw)
    assert list(table.columns) == COLUMNS
    cfp_row, dp_row, single_row = table.iloc[0], table.iloc[1], table.iloc[2]
    assert single_row["plan"] == "single" and math.isnan(single_row["predicted_step_s"])
    assert cfp_row["speedup"] == pytest.approx(1.5) and single_row["speedup"] == 1.0
    assert cfp_row["median_step_s"] == pytest.approx(0.010)
    assert cfp_row["prediction_error"] == pytest.approx(0.1)
    assert dp_row["ratio_to_cfp"] == pytest.approx(2.2)
    assert dp_row["configs"] == "batchx2"
    assert cfp_row["steps"] == 3 and dp_row["peak_mem_bytes"] == 200
    assert cfp_row["predicted_mem_bytes"] == 110 and cfp_row["mem_error"] == pytest.approx(0.1)
    assert dp_row["mem_error"] == pytest.approx(-0.25)


def test_rounds_shuffle_who_follows_whom():
    # With a fixed cyclic order the plan after the single row was always the same one and paid for it.
    orders = round_orders(6, 40)
    assert orders == round_orders(6, 40)  # seeded: a rerun interleaves the same way
    assert all(sorted(o) == list(range(6)) for o in orders)  # every plan once per round
    followers = {o[(o.index(5) + 1) % 6] for o in orders}
    assert len(followers) >= 4


def test_bench_runs_every_plan(tmp_path, monkeypatch):
    """Real profiles, real steps: one CSV row per plan, CFP's also on the DTensor interpreter, and the plain model's;
    equal first losses (same weights, same batch, same model), also without warm-up steps."""
    monkeypatch.setenv("CFP_PROFILE_DIR", str(tmp_path / "store"))
    plan_file = tmp_path / "megatron.json"
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
                "--baseline",
                "megatron",
                "-o",
                str(plan_file),
            ]
        )
        == 0
    )
    csv = tmp_path / "bench.csv"
    args = [
        "bench",
        "gpt:tiny",
        "--mesh",
        "2",
        "--plans",
        f"cfp,dp,fsdp,analytic,{plan_file},cfp+interpreted",
        "--steps",
        "3",
        "--warmup",
        "0",
        "--csv",
        str(csv),
    ]
    assert main(args) == 0
    table = pd.read_csv(csv)
    assert list(table["plan"]) == ["cfp", "dp", "fsdp", "analytic", "megatron", "cfp+interpreted", "single"]
    for col in (
        "plan",
        "median_step_s",
        "predicted_step_s",
        "peak_mem_bytes",
        "predicted_mem_bytes",
        "mem_error",
        "speedup",
    ):
        assert col in table.columns
    assert (table["median_step_s"] > 0).all() and (table["peak_mem_bytes"] > 0).all()
    assert (table["predicted_step_s"][:-1] > 0).all() and math.isnan(table["predicted_step_s"].iloc[-1])
    assert (table["predicted_mem_bytes"][:-1] > 0).all()
    assert table.loc[2, "layout"].startswith("zero3x")  # fsdp stores parameters sharded
    assert (table["steps"] == 3).all()
    assert table.loc[0, "ratio_to_cfp"] == 1.0
    assert table["first_loss"].max() - table["first_loss"].min() < 1e-4
    plans = table[table["plan"] != "single"]
    assert all(math.isfinite(e) for e in plans["prediction_error"])
    assert (table["speedup"] > 0).all() and table.loc[6, "speedup"] == 1.0


def test_bench_refuses_a_baseline_that_does_not_apply(tmp_path, monkeypatch):
    monkeypatch.setenv("CFP_PROFILE_DIR", str(tmp_path / "store"))
    with pytest.raises(cfp.CFPError, match="expert baseline does not apply"):
        cfp.bench("gpt:tiny", "2", plans=["expert"], steps=1)
    with pytest.raises(cfp.CFPError, match="Unknown plan"):
        cfp.bench("gpt:tiny", "2", plans=["fastest"], steps=1)
    with pytest.raises(cfp.CFPError, match="Unknown plan variant"):
        cfp.bench("gpt:tiny", "2", plans=["cfp+fast"], steps=1)
