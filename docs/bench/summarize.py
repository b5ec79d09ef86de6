"""Summarise the CSVs docs/bench/run.sh writes into docs/bench/README.md: one table per question, with each
issue target beside what was measured. Run from the repository root: python docs/bench/summarize.py"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pandas as pd

BENCH = Path("docs/bench")
WORKLOADS = ["gpt_tiny", "llama_tiny", "moe_tiny", "gpt_small_b8", "llama_small_b8", "moe_small_b8"]
BASELINES = ("dp", "megatron", "expert", "fsdp", "fsdp+tp", "analytic")


def spec(name: str) -> str:
    model, size, *batch = name.split("_")
    return f"{model}:{size}" + (f" --batch {batch[0][1:]}" if batch else "")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds == seconds else "-"  # NaN where a run had no such row


def pct(x: float) -> str:
    return f"{x * 100:+.0f}%"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b else "-"  # NaN where a run had no such row


def read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path).set_index("plan") if path.exists() else None


def best_baseline(df: pd.DataFrame) -> pd.Series:
    rows = df.loc[[p for p in BASELINES if p in df.index]]
    return rows.loc[rows["median_step_s"].idxmin()]


def same_plan(a: pd.Series, b: pd.Series, chosen: str) -> bool:
    """Every block in the same config, storage and recomputation: the same program, whose medians differ by noise.
    Either validation wrote baseline ``b`` itself (``chosen``, its plan file's pick), or both are one uniform layout
    ("batchx30"; a mixed one does not name each block's config)."""
    if chosen == b.name:
        return True
    return " " not in str(a["configs"]) and a["configs"] == b["configs"] and str(a["layout"]) == str(b["layout"])


def runtime_table() -> list[str]:
    out = [
        "## Runtime: plans against the plain model (issue #13)",
        "",
        "`cfp bench WORKLOAD --mesh 2 --interpreted --compile`: the plain model in one process with both cores "
        "(`single`), CFP's plan lowered (`cfp`), on the DTensor interpreter (`cfp+interpreted`) and compiled by "
        "inductor (`cfp+compiled`), the baselines, and the `ideal` row: the plain model on each rank's half of the "
        "batch, both ranks at once, with no communication. Targets for the `small` rows: the best plan at most 1.15x "
        "single's step, lowered at least 1.6x faster than interpreted, every plan's prediction within ±10% (worst "
        "of the lowered plans: the interpreted and compiled variants are predicted from the lowered programs' "
        "profiles on purpose, their error is what the runtime changes).",
        "",
        "| workload | single ms | ideal ms | cfp ms | cfp+compiled ms | best plan | best / single | ideal / single | "
        "best / ideal | interpreted / lowered | worst prediction error |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name in WORKLOADS:
        df = read(BENCH / f"{name}.csv")
        if df is None:
            continue
        plans = df.drop(index=[p for p in ("single", "ideal") if p in df.index])
        best = plans["median_step_s"].idxmin()
        step = df["median_step_s"]
        single, ideal = step.get("single", math.nan), step.get("ideal", math.nan)
        cfp, best_s = step["cfp"], step[best]
        variants = plans.index.str.endswith(("+interpreted", "+compiled"))
        errors = plans.loc[~variants, "prediction_error"].dropna()
        worst = errors.loc[errors.abs().idxmax()]
        out.append(
            f"| `{spec(name)}` | {ms(single)} | {ms(ideal)} | {ms(cfp)} | {ms(step.get('cfp+compiled', math.nan))} | "
            f"{best} {ms(best_s)} | {ratio(best_s, single)} | {ratio(ideal, single)} | {ratio(best_s, ideal)} | "
            f"{ratio(step.get('cfp+interpreted', math.nan), cfp)} | {pct(worst)} ({errors.abs().idxmax()}) |"
        )
    return out


def validated_table() -> list[str]:
    out = [
        "## Validated plans against the best baseline (issue #16)",
        "",
        "`cfp plan WORKLOAD --mesh 2 --backend real --validate 3` twice (the second run may learn a correction from "
        "the first), then an independent `cfp bench` of the second plan file (`validated`) against the ILP's own "
        "pick (`cfp`) and the baselines. Targets: validated at most 1.00x "
        "the best baseline's median or inside its IQR (here: at most its median plus half its IQR), or the same "
        "plan as that baseline (every block in the same config: the same program); every plan's corrected prediction "
        "within ±10%.",
        "",
        "| workload | validated ms (IQR) | best baseline ms (IQR) | validated / best | within IQR | "
        "worst error, corrected | worst error, raw |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name in WORKLOADS:
        df = read(BENCH / "validated" / name / "bench.csv")
        if df is None:
            continue
        val = df.loc["validated"]
        base = best_baseline(df)
        ratio = val["median_step_s"] / base["median_step_s"]
        inside = val["median_step_s"] <= base["median_step_s"] + base["iqr_step_s"] / 2
        chosen = json.loads((BENCH / "validated" / name / "validated.json").read_text())["validation"]["chosen"]
        met = "yes" if ratio <= 1.0 or inside else "same plan" if same_plan(val, base, chosen) else "no"
        corrected = df["prediction_error"].dropna()
        raw = df["raw_prediction_error"].dropna()
        out.append(
            f"| `{spec(name)}` | {ms(val['median_step_s'])} ({ms(val['iqr_step_s'])}) | {base.name} "
            f"{ms(base['median_step_s'])} ({ms(base['iqr_step_s'])}) | {ratio:.2f}x | "
            f"{met} | {pct(corrected.loc[corrected.abs().idxmax()])} "
            f"({corrected.abs().idxmax()}) | {pct(raw.loc[raw.abs().idxmax()])} |"
        )
    return out


def memory_table() -> list[str]:
    runs = {limit: read(BENCH / f"gpt-small-mesh2-{limit}.csv") for limit in ("36MB", "30MB")}
    if all(df is None for df in runs.values()):
        return []
    out = [
        "## Plans that fit: predicted against measured memory (issue #14)",
        "",
        "`cfp bench gpt:small --mesh 2 --memory 36MB` with the plan `cfp plan --memory 36MB --validate 3` wrote, "
        "and `cfp bench gpt:small --mesh 2 --memory 30MB --plans cfp,fsdp` (a limit that makes the ILP recompute). "
        "Targets: measured peak within 15% of predicted for every plan; CFP at least as fast as fsdp and fsdp+tp.",
        "",
        "| limit | plan | step ms (IQR) | peak MiB/rank | predicted MiB | memory error | layout |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for limit, df in runs.items():
        for plan, row in df.iterrows() if df is not None else ():
            if plan in ("single", "ideal"):
                continue
            layout = row["layout"] if isinstance(row.get("layout"), str) else "all replicated, none recomputed"
            out.append(
                f"| {limit} | {plan} | {ms(row['median_step_s'])} ({ms(row['iqr_step_s'])}) | "
                f"{row['peak_mem_bytes'] / 2**20:.1f} | {row['predicted_mem_bytes'] / 2**20:.1f} | "
                f"{pct(row['mem_error'])} | {layout} |"
            )
    return out


def gpu_table() -> list[str]:
    gpu = BENCH / "gpu"
    csvs = sorted(gpu.glob("*.csv"))
    if not csvs:
        return []
    device = (gpu / "device.txt").read_text().splitlines()
    out = [
        "## On a GPU (docs/bench/gpu.sh)",
        "",
        f"`bash docs/bench/gpu.sh` on {device[1].split(',')[0]} ({device[2]}), NCCL, mesh of 1 (the machine has one "
        "GPU, so every layout is the replicated plan and the rows compare runtimes). Full tables and the failures "
        "in `gpu/bench.txt`; the prediction error before profiles took a program call's fixed cost off each block "
        "from `gpu/before_call_probe/`.",
        "",
        "| workload | single ms | cfp (lowered) ms | interpreted / lowered | compiled ms | single / compiled | "
        "prediction error | before the call probe | memory error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in csvs:
        df = read(path)
        before = read(gpu / "before_call_probe" / path.name)
        cfp, single = df.loc["cfp"], df.loc["single", "median_step_s"]
        compiled = df.loc["cfp+compiled", "median_step_s"]
        out.append(
            f"| `{spec(re.sub(r'_mesh[0-9x]+$', '', path.stem))}` | {ms(single)} | {ms(cfp['median_step_s'])} | "
            f"{df.loc['cfp+interpreted', 'median_step_s'] / cfp['median_step_s']:.2f}x | {ms(compiled)} | "
            f"{single / compiled:.2f}x | {pct(cfp['prediction_error'])} | "
            f"{pct(before.loc['cfp', 'prediction_error']) if before is not None else '-'} | {pct(cfp['mem_error'])} |"
        )
    return out


def main() -> int:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python docs/bench/summarize.py` from the CSVs of `bash docs/bench/run.sh` (2-core CPU machine, "
        "2 gloo ranks with one thread each), and of `bash docs/bench/gpu.sh` (last table). The full tables are the "
        "`.txt` files beside this one.",
        "",
    ]
    for table in (runtime_table(), validated_table(), memory_table(), gpu_table()):
        if table:
            lines += table + [""]
    (BENCH / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
