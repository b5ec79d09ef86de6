#!/bin/bash
# Every README bench table: each example model at two workload sizes on 2 gloo ranks.
# Run from the repository root in the project's environment; writes docs/bench/*.csv and *.txt.
set -eo pipefail
for spec in "gpt:tiny" "gpt:small --batch 8" "llama:tiny" "llama:small --batch 8" "moe:tiny" "moe:small --batch 8"; do
  name=$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')
  echo "== cfp bench $spec --mesh 2"
  COLUMNS=150 cfp bench $spec --mesh 2 --csv "docs/bench/$name.csv" 2>&1 | grep -v "alltoall yet" | tee "docs/bench/$name.txt"
done

# Validated plans (cfp plan --validate 3), then an independent bench of that plan file (the "validated" row) against
# the ILP's own pick ("cfp") and the baselines. Writes docs/bench/validated/<workload>/{validated.json,plan.txt,bench.csv,bench.txt}.
for spec in "gpt:tiny" "gpt:small --batch 8" "llama:tiny" "llama:small --batch 8" "moe:tiny" "moe:small --batch 8"; do
  out=docs/bench/validated/$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')
  mkdir -p "$out"
  echo "== cfp plan $spec --mesh 2 --backend real --validate 3"
  COLUMNS=150 cfp plan $spec --mesh 2 --backend real --validate 3 -o "$out/validated.json" 2>&1 | grep -v "alltoall yet" | tee "$out/plan.txt"
  baselines=dp,megatron,analytic
  if grep -q '"name": "expert"' "$out/validated.json"; then baselines=$baselines,expert; fi
  echo "== cfp bench $spec --mesh 2 --plans cfp,$out/validated.json,$baselines"
  COLUMNS=150 cfp bench $spec --mesh 2 --plans "cfp,$out/validated.json,$baselines" --csv "$out/bench.csv" 2>&1 \
    | grep -v "alltoall yet" | tee "$out/bench.txt"
done
