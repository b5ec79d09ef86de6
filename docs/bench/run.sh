#!/bin/bash
# Every README bench table: each example model at two workload sizes on 2 gloo ranks, with the plain model
# (the single row) and CFP's plan on the DTensor interpreter beside the lowered plans.
# Run from the repository root in the project's environment; writes docs/bench/*.csv and *.txt.
# SIZES="small" bash docs/bench/run.sh runs only the batch-8 small presets.
set -eo pipefail
for size in ${SIZES:-tiny small}; do
  for model in gpt llama moe; do
    spec="$model:$size"; [ "$size" = small ] && spec="$spec --batch 8"
    name=$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')
    echo "== cfp bench $spec --mesh 2 --interpreted"
    COLUMNS=170 cfp bench $spec --mesh 2 --interpreted --csv "docs/bench/$name.csv" 2>&1 | grep -v "alltoall yet" | tee "docs/bench/$name.txt"
  done
done
