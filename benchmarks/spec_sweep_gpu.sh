#!/usr/bin/env bash
# Issue 11 on the GPU machine, two calls back to back (the machine stays warm ~30 s between them):
#   1. run(carry=[".carry1"]):  bash benchmarks/spec_sweep_gpu.sh park       # parks .carry1/part00 in /tmp/gguf
#   1b. the same with carry=[".carry1b"] right after (the GGUF travels in three parts: benchmarks/gguf_carry.sh)
#   2. run(carry=[".carry2"]):  bash benchmarks/spec_sweep_gpu.sh "$OUT" [sweep|compare]
# sweep (default): benchmarks/spec_tree_sweep.py on `tiny` float32 (tree shapes, isolated costs, kernel profile).
#   The inductor-compiled drafter beside the captured-eager one, bf16 (issue 11, next to measure):
#   DTYPE=bfloat16 SHAPES=4x8x32,4x8x32f CHAINS=4,4f VARIANTS= N=3 bash benchmarks/spec_sweep_gpu.sh "$OUT" sweep
#   (2026-12-03, H200: with SHAPES=4x8x32,4x8x32c,4x8x32f,4x4x16f CHAINS=4,4f the warm-up sample alone — inductor
#   compiling every variant, each fused body with the whole target inside — took most of 482 s: keep the list short)
#   (suffix c: drafter bodies compiled by inductor, --draft-compile; f: one fused graph a step, --fused-step)
#   and the strategies with it: EXTRA="--draft-compile default" bash benchmarks/spec_sweep_gpu.sh "$OUT" compare
# compare: the final `compare baseline compile compile+eagle compile+eagle-tree`, float32 then bfloat16 --fp32-check
# (STRATS to choose the strategies, e.g. STRATS='compile fused+compile compile+eagle fused+compile+eagle'; DTYPES to choose; since 2026-12-03 the fused step is the CUDA default, EXTRA=--no-fused-step times the loop instead)
# (N=${N:-10}, --warmup 2, --compile-mode default). Everything lands in OUT/results.tgz (packed after each stage, and
# after LIMIT seconds (default 540) cut a stage: journal and logs so far; 2026-12-03 an outer `timeout` lost a whole run).
set -uo pipefail
if [ "${1:-}" = park ]; then
  bash benchmarks/gguf_carry.sh park; exit
fi
out=$1; what=${2:-sweep}
gguf=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
bash benchmarks/gguf_carry.sh join || exit 3  # the first measuring call carries .carry2; later ones find the joined file
[ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines
[ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
export PYTHONPATH=/tmp/site:$PWD EGPT_SPEED_GGUF=$gguf EGPT_SPEED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
mkdir -p /tmp/res && rm -rf /tmp/res/*
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee /tmp/res/card.txt
echo "LIMIT=${LIMIT:-} STRATS='${STRATS:-}' DTYPES=${DTYPES:-} DTYPE=${DTYPE:-} SHAPES=${SHAPES:-} CHAINS=${CHAINS:-} EXTRA=${EXTRA:-} N=${N:-} bash benchmarks/spec_sweep_gpu.sh \$OUT $what  # git $(git rev-parse --short HEAD 2>/dev/null)" > /tmp/res/command.txt
pack() { tar czf "$out/results.tgz" -C /tmp/res .; }
deadline=${LIMIT:-540}  # SECONDS counts from the script's start: each part runs under what is left, then packs
left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }
if [ "$what" = sweep ]; then
  timeout -k 10 "$(left)" python3 benchmarks/spec_tree_sweep.py --out /tmp/res --dtype "${DTYPE:-float32}" --samples "${N:-4}" --warmup 1 \
      ${VARIANTS---variants} ${SHAPES:+--shapes "$SHAPES"} ${CHAINS:+--chains "$CHAINS"} 2>&1 \
    | grep --line-buffered -v -i "warn\|Loading weights" | tee /tmp/res/sweep.log | tail -40
  pack; exit
fi
common=(--model tiny --max-new-tokens 64 --compile-mode default --out /tmp/res ${EXTRA:-})
for dtype in ${DTYPES:-float32 bfloat16}; do  # DTYPES=bfloat16: the one that decides issue 11's goal, in less time
  [ "$(left)" -gt 30 ] || break  # no time left for another dtype: it would only leave a header-only journal
  check=(); [ "$dtype" = bfloat16 ] && check=(--fp32-check)
  timeout -k 10 "$(left)" python3 -m egpt_speed.cli compare ${STRATS:-baseline compile compile+eagle compile+eagle-tree} --dtype "$dtype" "${check[@]}" -n "${N:-10}" --warmup 2 \
    "${common[@]}" 2>&1 | tee "/tmp/res/${dtype}.log" | tail -32; pack
done
