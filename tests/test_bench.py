"""cfp bench: every plan in real interleaved training steps on a 2-rank gloo group."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import cfp
from cfp.bench import COLUMNS, BenchPlan, _no_ideal, batch_share, resident_bytes, round_orders, summarize
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
        "ideal": {"steps": steps([0.006, 0.005, 0.007]), "peak_mem_bytes": 90, "first_loss": 5.4},
        "single": {"steps": steps([0.015, 0.016, 0.014]), "peak_mem_bytes": 300, "first_loss": 5.5},
    }
    table = summarize(plans, raw)
    assert list(table.columns) == COLUMNS
    cfp_row, dp_row, ideal_row, single_row = (table.iloc[i] for i in range(4))
    assert single_row["plan"] == "single" and math.isnan(single_row["predicted_step_s"])
    assert cfp_row["speedup"] == pytest.approx(1.5) and single_row["speedup"] == 1.0
    # the ideal row trains on a share of the batch: its speedup is the ideal one, its loss is not comparable
    assert ideal_row["plan"] == "ideal" and ideal_row["speedup"] == pytest.approx(2.5)
    assert math.isnan(ideal_row["first_loss"]) and math.isnan(ideal_row["prediction_error"])
    assert cfp_row["median_step_s"] == pytest.approx(0.010)
    assert cfp_row["prediction_error"] == pytest.approx(0.1)
    assert dp_row["ratio_to_cfp"] == pytest.approx(2.2)
    assert dp_row["configs"] == "batchx2"
    assert cfp_row["steps"] == 3 and dp_row["peak_mem_bytes"] == 200
    assert cfp_row["predicted_mem_bytes"] == 110 and cfp_row["mem_error"] == pytest.approx(0.1)
    assert dp_row["mem_error"] == pytest.approx(-0.25)


def test_batch_share_splits_what_carries_the_batch():
    idx, mask, scale = torch.arange(12).reshape(4, 3), torch.ones(3, 3), torch.tensor(2.0)
    share = batch_share((idx, mask, scale, "mean"), 1, 2)
    assert torch.equal(share[0], idx[2:]) and share[1] is mask and share[2] is scale and share[3] == "mean"
    assert batch_share((idx,), 0, 3) is None  # 4 rows over 3 ranks


def test_ideal_row_is_left_out_where_the_batch_does_not_split():
    from cfp.mesh import parse_mesh

    assert _no_ideal(cfp.ModelSpec("gpt:tiny", batch=3), parse_mesh("2")) == (
        "the batch (3) does not split evenly over 2 ranks"
    )
    assert _no_ideal(cfp.ModelSpec("gpt:tiny", batch=4), parse_mesh("2")) == ""


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
    assert list(table["plan"]) == ["cfp", "dp", "fsdp", "analytic", "megatron", "cfp+interpreted", "ideal", "single"]
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
    assert (table["predicted_step_s"][:-2] > 0).all() and table["predicted_step_s"][-2:].isna().all()
    assert (table["predicted_mem_bytes"][:-2] > 0).all()
    assert table.loc[2, "layout"].startswith("zero3x")  # fsdp stores parameters sharded
    assert (table["steps"] == 3).all()
    assert table.loc[0, "ratio_to_cfp"] == 1.0
    same_batch = table[table["plan"] != "ideal"]
    assert same_batch["first_loss"].max() - same_batch["first_loss"].min() < 1e-4
    plans = table[~table["plan"].isin(["ideal", "single"])]
    assert all(math.isfinite(e) for e in plans["prediction_error"])
    assert (table["speedup"] > 0).all() and table.loc[7, "speedup"] == 1.0


def test_bench_refuses_a_baseline_that_does_not_apply(tmp_path, monkeypatch):
    monkeypatch.setenv("CFP_PROFILE_DIR", str(tmp_path / "store"))
    with pytest.raises(cfp.CFPError, match="expert baseline does not apply"):
        cfp.bench("gpt:tiny", "2", plans=["expert"], steps=1)
    with pytest.raises(cfp.CFPError, match="Unknown plan"):
        cfp.bench("gpt:tiny", "2", plans=["fastest"], steps=1)
    with pytest.raises(cfp.CFPError, match="Unknown plan variant"):
        cfp.bench("gpt:tiny", "2", plans=["cfp+fast"], steps=1)
