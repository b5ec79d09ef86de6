#!/bin/bash
# Every README bench table: each example model at two workload sizes on 2 gloo ranks.
# Run from the repository root in the project's environment; writes docs/bench/*.csv and *.txt.
set -eo pipefail
for spec in "gpt:tiny" "gpt:small --batch 8" "llama:tiny" "llama:small --batch 8" "moe:tiny" "moe:small --batch 8"; do
  name=$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')
  echo "== cfp bench $spec --mesh 2"
  COLUMNS=150 cfp bench $spec --mesh 2 --csv "docs/bench/$name.csv" 2>&1 | grep -v "alltoall yet" | tee "docs/bench/$name.txt"
done
