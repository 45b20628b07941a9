#!/usr/bin/env bash
# Issue 11 on the GPU machine, last of three calls (the first two parked .carry1 and .carry1b in /tmp/gguf/: benchmarks/gguf_carry.sh park):
#   bash benchmarks/compile_eagle_gpu.sh OUT_DIR
# joins the SmolLM2 GGUF, installs the project, then runs `tiny` float32 and bfloat16
# `compare baseline compile compile+eagle compile+eagle-tree` (one interleaved run each, same
# compile mode) and the draft-head profile; everything lands in OUT_DIR/results.tgz.
set -uo pipefail
out=$1
mkdir -p /tmp/gguf /tmp/res
bash benchmarks/gguf_carry.sh join || exit 3
export PYTHONPATH=/tmp/site EGPT_SPEED_GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf EGPT_SPEED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee /tmp/res/card.txt
cli() { python3 -m egpt_speed.cli "$@"; }
pack() { tar czf "$out/results.tgz" -C /tmp/res .; }  # after every stage: a run cut by the time limit keeps what finished
common=(--model tiny --max-new-tokens 64 --compile-mode default --out /tmp/res)
cli compare baseline compile compile+eagle compile+eagle-tree --dtype float32 -n ${N:-10} --warmup 2 "${common[@]}" 2>&1 | tee /tmp/res/fp32.log | tail -30; pack
python3 benchmarks/eagle_head_profile.py --out /tmp/res 2>&1 | tail -12; pack
cli compare baseline compile compile+eagle compile+eagle-tree --dtype bfloat16 -n ${N:-10} --warmup 2 "${common[@]}" 2>&1 | tee /tmp/res/bf16.log | tail -30
pack
