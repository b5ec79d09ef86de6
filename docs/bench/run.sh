#!/bin/bash
# Every README bench table: each example model at two workload sizes on 2 gloo ranks, with the plain model
# (the single row), the ideal row, and CFP's plan on the DTensor interpreter and compiled by inductor beside the
# lowered plans.
# Run from the repository root in the project's environment; writes docs/bench/*.csv and *.txt.
# SIZES="small" bash docs/bench/run.sh runs only the batch-8 small presets.
set -eo pipefail
for size in ${SIZES:-tiny small}; do
  for model in gpt llama moe; do
    spec="$model:$size"; [ "$size" = small ] && spec="$spec --batch 8"
    name=$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')
    echo "== cfp bench $spec --mesh 2 --interpreted --compile"
    COLUMNS=170 cfp bench $spec --mesh 2 --interpreted --compile --csv "docs/bench/$name.csv" 2>&1 | grep -v "alltoall yet" | tee "docs/bench/$name.txt"
  done
done

# Validated plans (cfp plan --validate 3, twice: a correction must predict another validation run's pairs, so the
# second run can learn from the first), then an independent bench of the second plan file (the "validated" row)
# against the ILP's own pick ("cfp") and the baselines.
# Writes docs/bench/validated/<workload>/{plan-first.txt,validated.json,plan.txt,bench.csv,bench.txt}.
for spec in "gpt:tiny" "gpt:small --batch 8" "llama:tiny" "llama:small --batch 8" "moe:tiny" "moe:small --batch 8"; do
  out=docs/bench/validated/$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')
  mkdir -p "$out"
  echo "== cfp plan $spec --mesh 2 --backend real --validate 3 (twice)"
  COLUMNS=150 cfp plan $spec --mesh 2 --backend real --validate 3 -o "$out/validated.json" 2>&1 | grep -v "alltoall yet" > "$out/plan-first.txt"
  COLUMNS=150 cfp plan $spec --mesh 2 --backend real --validate 3 -o "$out/validated.json" 2>&1 | grep -v "alltoall yet" | tee "$out/plan.txt"
  baselines=dp,megatron,analytic
  if grep -q '"name": "expert"' "$out/validated.json"; then baselines=$baselines,expert; fi
  echo "== cfp bench $spec --mesh 2 --plans cfp,$out/validated.json,$baselines"
  COLUMNS=150 cfp bench $spec --mesh 2 --plans "cfp,$out/validated.json,$baselines" --csv "$out/bench.csv" 2>&1 \
    | grep -v "alltoall yet" | tee "$out/bench.txt"
done

# -- Issue #14, plans that fit: storage sharding (ZeRO-1/2/3) and recomputation.
out=docs/bench

# 1. GPT-3 175B on 8x8 H100s (analytic costs), 80 GiB per device: a plan fits with storage sharding and
#    recomputation; without either no plan does (recomputation alone is enough, see the README). --time-limit 25 keeps the whole command under 60 s;
#    the default 60 s limit finds the same predicted step time.
( time cfp plan gpt:gpt3-175b --mesh 8x8 --cost analytic --memory 80GiB --time-limit 25 -o $out/gpt3-175b-8x8-80GiB.json ) \
  > $out/gpt3-175b-8x8-80GiB.txt 2>&1
( time cfp plan gpt:gpt3-175b --mesh 8x8 --cost analytic --memory 80GiB --no-storage-sharding -o /tmp/none.json ) \
  > $out/gpt3-175b-8x8-80GiB-no-storage-sharding.txt 2>&1 || true
( time cfp plan gpt:gpt3-175b --mesh 8x8 --cost analytic --memory 80GiB --no-storage-sharding --no-recompute -o /tmp/none.json ) \
  > $out/gpt3-175b-8x8-80GiB-replicated-storage-no-recompute.txt 2>&1 || true

# 2. LLaMA-7B on 8 H100s (analytic costs), 40 GiB per device; the plan file records dp, megatron, fsdp and
#    fsdp+tp under the same cost model (its baselines: predicted step time, memory, whether they fit).
cfp plan llama:llama-7b --mesh 8 --cost analytic --memory 40GiB -o $out/llama-7b-mesh8-40GiB.json > $out/llama-7b-mesh8-40GiB.txt 2>&1

# 3. gpt:small on 2 gloo ranks, real profiles and real training steps, with a limit that rules out data
#    parallelism and Megatron as the ILP counts memory: predicted vs measured peak memory per rank.
export CFP_PROFILE_DIR=${CFP_PROFILE_DIR:-/tmp/cfp-bench-profiles}
# The validated plan (what `cfp plan` writes by default on this machine) is benched beside the ILP's own pick.
cfp plan gpt:small --mesh 2 --memory 36MB --backend real --validate 3 -o $out/gpt-small-mesh2-36MB-validated.json \
  > $out/gpt-small-mesh2-36MB-validated.txt 2>&1
cfp bench gpt:small --mesh 2 --memory 36MB --plans cfp,$out/gpt-small-mesh2-36MB-validated.json,dp,megatron,fsdp,fsdp+tp --steps 20 \
  --csv $out/gpt-small-mesh2-36MB.csv --json $out/gpt-small-mesh2-36MB.json > $out/gpt-small-mesh2-36MB.txt 2>&1
# 4. A tighter limit makes the ILP recompute blocks: the peak of a recomputing plan against its count.
cfp bench gpt:small --mesh 2 --memory 30MB --plans cfp,fsdp --steps 10 \
  --csv $out/gpt-small-mesh2-30MB.csv > $out/gpt-small-mesh2-30MB.txt 2>&1
python docs/bench/summarize.py > /dev/null  # docs/bench/README.md: every target beside what was measured
