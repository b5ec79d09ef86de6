#!/bin/bash
# The README's benches on a GPU machine, in one command: NCCL, one rank per GPU, the plain model on one GPU as
# the single row, CFP's plan lowered, interpreted (--interpreted) and compiled by inductor (--compile).
# Run from the repository root with a CUDA build of torch installed; writes $BENCH_OUT (default docs/bench/gpu):
# device.txt, one CSV per workload and every table in bench.txt.
# NGPU=2 bash docs/bench/gpu.sh uses the first 2 GPUs. On one GPU the mesh is 1 and every layout is the same
# replicated plan, so only cfp runs: the rows then compare the runtimes (single, lowered, interpreted, compiled).
# WORKLOADS='gpt:small --batch 8;llama:small --batch 8' picks the workloads. A workload that fails or passes
# SPEC_TIMEOUT seconds is reported and the next one runs.
set -o pipefail
ngpu=${NGPU:-$(nvidia-smi -L | wc -l)}
out=${BENCH_OUT:-docs/bench/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())" >> "$out/device.txt"
plans=()
[ "$ngpu" -eq 1 ] && plans=(--plans cfp)
IFS=';' read -ra workloads <<< "${WORKLOADS:-gpt:small --batch 8;gpt:gpt2 --batch 8;llama:small --batch 8;moe:small --batch 8}"
for spec in "${workloads[@]}"; do
  name=$(echo "$spec" | sed 's/ --batch /_b/; s/:/_/')_mesh$ngpu
  echo "== cfp bench $spec --device cuda --mesh $ngpu ${plans[*]} --interpreted --compile" | tee -a "$out/bench.txt"
  COLUMNS=200 timeout "${SPEC_TIMEOUT:-600}" cfp bench $spec --device cuda --mesh "$ngpu" "${plans[@]}" \
    --interpreted --compile --csv "$out/$name.csv" 2>&1 | tee -a "$out/bench.txt" \
    || echo "== $spec failed or timed out (exit $?)" | tee -a "$out/bench.txt"
done
# What holds the plain model's peak on the GPU (the allocator's count beside MemTracker's categories).
timeout "${SPEC_TIMEOUT:-600}" python3 docs/bench/gpu_memory.py 2>&1 | grep -v Warn | tee "$out/memory.txt"
