#!/bin/bash
# The README's benches on a GPU machine, in one command: NCCL, one rank per GPU, the plain model on one GPU as
# the single row, CFP's plan lowered, interpreted (--interpreted) and compiled by inductor (--compile).
# Run from the repository root with a CUDA build of torch installed; writes docs/bench/gpu/*.csv and *.txt.
# NGPU=2 bash docs/bench/gpu.sh uses the first 2 GPUs; a 1-GPU machine benches the runtimes on a mesh of 1.
set -eo pipefail
ngpu=${NGPU:-$(nvidia-smi -L | wc -l)}
out=docs/bench/gpu
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())" >> "$out/device.txt"
for spec in "gpt:small --batch 8" "llama:small --batch 8" "moe:small --batch 8" "gpt:gpt2 --batch 8"; do
  name=$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')_mesh$ngpu
  echo "== cfp bench $spec --device cuda --mesh $ngpu --interpreted --compile"
  COLUMNS=200 cfp bench $spec --device cuda --mesh "$ngpu" --interpreted --compile --csv "$out/$name.csv" 2>&1 \
    | tee "$out/$name.txt"
done
