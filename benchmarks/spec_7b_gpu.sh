#!/usr/bin/env bash
# Issue 11 at 7B shape on the GPU machine (run 2026-12-03: benchmarks/results/issue11_h200_20261203_*.md). synthetic-7b borrows the SmolLM2
# tokenizer, so the GGUF travels in three parts (benchmarks/gguf_carry.sh; the machine stays warm ~30 s between calls):
#   1. run(carry=[".carry1"]), then run(carry=[".carry1b"]):  bash benchmarks/gguf_carry.sh park
#   2. run(carry=[".carry2", ".whl"]):  bash benchmarks/spec_7b_gpu.sh "$OUT" fused     # ~6 min
#   3. run(carry=[".carry2", ".whl"]):  bash benchmarks/spec_7b_gpu.sh "$OUT" tree      # ~3 min (SKIP_EAGER=1: less)
#   quant: int8wo/int4wo+compile against the compiled step (~3 min); attention: benchmarks/attention_probe.py
#   ATTENTION=flex SKIP_EAGER=1 ... tree: the compiled step and verifies with the `flex` block-mask attention
#   VARIANTS='compile; compile, coordinate descent; compile, coordinate descent, all directions, radius 2' QUANT= ... fused:
#   the coordinate-descent step's run-to-run spread against the tuner's wider search (benchmarks/step_bandwidth_7b.py)
#   COMPILE_MODE=max-autotune-no-cudagraphs ... tree: the CLI's CUDA default (Triton GEMM templates autotuned against
#   cuBLAS for the 33-row verify's shapes; ~10 s a shape), instead of `default`
# .whl holds torchao-0.18.0 and gemlite-0.5.1.post1 (a pure-Python wheel built here from its sdist: `pip wheel --no-deps
# --no-build-isolation gemlite==0.5.1.post1 -w .whl`: torchao 0.18 cannot read 0.6's packing); QUANT=int8wo,int4wo,int4wo-gemlite
# chooses the quantized variants; int4wo-gemlite runs in float16 only: DTYPE=float16 QUANT=int4wo-gemlite ... quant
# (HQQ quantizing + compiling the GemLite model took more than the 180 s a 2026-12-03 call had left: give it LIMIT=540).
# fused: compiled decode step MBU with and without `fused`, int8wo (under torchao's inductor settings, and -plain without)
# kernel tables (benchmarks/step_bandwidth_7b.py). tree: compiled tree verify 16/32/64 nodes vs one compiled step
# and the head costs (benchmarks/spec_cost_static.py, no quantization). Results: OUT/results.tgz, packed even when
# LIMIT (540 s) cuts the measurement: both scripts save after each part.
set -uo pipefail
out=$1; what=${2:-fused}
gguf=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
[ "$what" = attention ] || bash benchmarks/gguf_carry.sh join || exit 3  # the probe needs no tokenizer
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
[ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines
[ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
export PYTHONPATH=/tmp/site:$PWD EGPT_SPEED_GGUF=$gguf EGPT_SPEED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
mkdir -p /tmp/res7 && rm -rf /tmp/res7/*
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > /tmp/res7/card.txt
echo "DTYPE=${DTYPE:-} VARIANTS='${VARIANTS:-}' COMPILE_MODE=${COMPILE_MODE:-} QUANT=${QUANT:-} LIMIT=${LIMIT:-} SKIP_EAGER=${SKIP_EAGER:-} ATTENTION=${ATTENTION:-} bash benchmarks/spec_7b_gpu.sh \$OUT $what  # git $(git rev-parse --short HEAD 2>/dev/null)" > /tmp/res7/command.txt
if [ "$what" = fused ]; then
  timeout "${LIMIT:-540}" python3 benchmarks/step_bandwidth_7b.py --model synthetic-7b --dtype bfloat16 --compile-mode "${COMPILE_MODE:-default}" --quant "${QUANT-int8wo,int8wo-plain}" ${VARIANTS:+--variants "$VARIANTS"} --out /tmp/res7 2>&1 \
    | grep --line-buffered -v -i "warn\|Loading weights" | tee /tmp/res7/fused.log | tail -60
elif [ "$what" = quant ]; then  # int8wo / int4wo + compile (torchao's settings; no -plain kinds here) against the compiled bf16 step
  timeout "${LIMIT:-540}" python3 benchmarks/spec_cost_static.py --model synthetic-7b --dtype "${DTYPE:-bfloat16}" --compile-mode "${COMPILE_MODE:-default}" --repeats 30 \
    --only-quant --quant "${QUANT:-int8wo,int4wo}" --out /tmp/res7 2>&1 | grep --line-buffered -v -i "warn\|Loading weights" | tee /tmp/res7/quant.log | tail -60
elif [ "$what" = attention ]; then  # no GGUF needed; SDPA backends vs FlexAttention over the static cache
  timeout "${LIMIT:-540}" python3 benchmarks/attention_probe.py --out /tmp/res7 2>&1 | grep --line-buffered -v -i "warn" | tee /tmp/res7/attention.log | tail -40
else
  timeout "${LIMIT:-540}" python3 benchmarks/spec_cost_static.py ${SKIP_EAGER:+--skip-eager} --attention "${ATTENTION:-sdpa}" --model synthetic-7b --dtype bfloat16 --compile-mode "${COMPILE_MODE:-default}" --repeats 30 \
    --tree-nodes 16,32,64 --compiled-tree-nodes 16,32,64 --tree-depth 5 --quant "" --out /tmp/res7 2>&1 \
    | grep --line-buffered -v -i "warn\|Loading weights" | tee /tmp/res7/tree.log | tail -60
fi
tar czf "$out/results.tgz" -C /tmp/res7 .
