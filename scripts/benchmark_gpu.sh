#!/usr/bin/env bash
# The speed issue's GPU check in one run: training and inference throughput and peak GPU memory of the
# paper's B4 model at 224 and 320 px, in fp32 and bf16-mixed (batch 8, feature cache in GPU memory).
#
#   bash scripts/benchmark_gpu.sh [output folder] [extra benchmark.py arguments ...]
#
# Writes <folder>/b4_<size>px_<precision>.{json,txt} and prints each table. BENCHMARK_DEVICE (default
# cuda) selects the device, e.g. BENCHMARK_DEVICE=cpu with small --steps to try the script out.
set -euo pipefail
out="${1:-benchmark_gpu}"
shift || true
device="${BENCHMARK_DEVICE:-cuda}"
mkdir -p "$out"
for size in 224 320; do
  for precision in 32-true bf16-mixed; do
    name="$out/b4_${size}px_${precision}"
    python scripts/benchmark.py --device "$device" data.image_size="$size" data.batch_size=8 \
      trainer.precision="$precision" model.feature_cache=memory --json "$name.json" "$@" | tee "$name.txt"
  done
done
