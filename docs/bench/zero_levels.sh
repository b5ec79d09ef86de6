#!/bin/bash
# Each ZeRO level on every block against data parallelism (gpt:small --batch 8, 2 gloo ranks), to see what each
# level's collectives cost in a step against what the profiles price them at. Run from the repository root in the
# project's environment; writes docs/bench/zero_levels.{csv,txt}.
set -eo pipefail
plans=$(mktemp -d)
python - "$plans" <<'PY'
import sys

from cfp import baselines
from cfp.mesh import parse_mesh
from cfp.parallelize import plan_from_indices
from cfp.pipeline import PlanOptions, analyse
from cfp.spec import ModelSpec

graph = analyse(ModelSpec("gpt:small", batch=8, device="meta"), parse_mesh("2"), PlanOptions(cost="analytic"))
dp = baselines.dp(graph)
for level in ("zero1", "zero2", "zero3"):
    plan_from_indices(graph, dp, [level] * len(graph.blocks)).save(f"{sys.argv[1]}/{level}.json")
PY
COLUMNS=170 cfp bench gpt:small --batch 8 --mesh 2 --plans "dp,$plans/zero1.json,$plans/zero2.json,$plans/zero3.json" \
  --steps 10 --no-single --csv docs/bench/zero_levels.csv | tee docs/bench/zero_levels.txt
python - <<'PY' | tee -a docs/bench/zero_levels.txt
import pandas as pd

d = pd.read_csv("docs/bench/zero_levels.csv").set_index("plan")
for plan in ("zero1", "zero2", "zero3"):
    measured = (d.loc[plan, "fwd_bwd_s"] - d.loc["dp", "fwd_bwd_s"]) * 1e3
    predicted = (d.loc[plan, "raw_predicted_step_s"] - d.loc["dp", "raw_predicted_step_s"]) * 1e3
    print(f"{plan}: forward+backward {measured:+.1f} ms over dp measured, {predicted:+.1f} ms predicted (raw)")
PY
