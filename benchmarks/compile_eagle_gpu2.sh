#!/usr/bin/env bash
# Issue 11 on the GPU machine, second of two calls (benchmarks/spec_cost_static_gpu.sh parked .carry1/part00 in /tmp/gguf):
#   run(carry=[".carry2"]): bash benchmarks/compile_eagle_gpu2.sh $OUT
# joins the SmolLM2 GGUF, then on `tiny`: the static-path cost decomposition (spec_cost_static.py, fp32: decode step,
# tree verify 16/32/64, captured head) and `compare baseline compile compile+eagle compile+eagle-tree` in float32 and
# bfloat16 (one interleaved run each, --compile-mode default). Results land directly in OUT.
set -uo pipefail
out=$1
cat /tmp/gguf/part00 .carry2/part01 > /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .carry2/sha)  /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry2/*.whl
[ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines
[ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
export PYTHONPATH=/tmp/site:$PWD EGPT_SPEED_GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf EGPT_SPEED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
cli() { python3 -m egpt_speed.cli "$@"; }
common=(--model tiny --max-new-tokens 64 --compile-mode default --warmup 1 -n ${N:-6})
mkdir -p /tmp/res
compare() {  # DTYPE: one interleaved run; json + md come back, the log's table is printed
  cli compare baseline compile compile+eagle compile+eagle-tree --dtype "$1" "${common[@]}" --out /tmp/res > "/tmp/res/$1.log" 2>&1
  cp /tmp/res/compare_*.json /tmp/res/compare_*.md "$out/" 2>/dev/null; grep -v Warn "/tmp/res/$1.log" | tail -20
}
compare float32
python3 benchmarks/spec_cost_static.py --model tiny --dtype float32 --compile-mode default --repeats 30 --tree-nodes 16,32,64 \
  --compiled-tree-nodes 32 --tree-depth 4 --quant "" --out "$out" > "$out/spec_tiny.log" 2>&1
grep -v Warn "$out/spec_tiny.log" | tail -30
compare bfloat16
