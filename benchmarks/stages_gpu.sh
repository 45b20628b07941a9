#!/usr/bin/env bash
# Issue 13 on one GPU (kind nvidia-h200), in one measuring call. The SmolLM2 GGUF (needed by `tiny`
# and by synthetic-7b's tokenizer) travels in three parts (benchmarks/gguf_carry.sh):
#   1. run(carry=[".carry1"]):  bash benchmarks/stages_gpu.sh park
#   1b. the same with carry=[".carry1b"] right after (the GGUF travels in three parts: benchmarks/gguf_carry.sh)
#   2. run(carry=[".carry2"]):  bash benchmarks/stages_gpu.sh "$OUT"       # within ~30 s of call 1
# Call 2 writes ONE file, $OUT/stages_gpu_<stamp>.tar.gz, holding:
#   (a) stages_bench_synthetic-7b_cuda_*.{json,md} + _profile.txt: Stages 1-3 of synthetic-7b bf16
#       10^6-event clips, --preprocess cpu vs device alternating, medians over CLIPS x REPEATS samples
#       after warm-up, Stage 3 alone per vision mode (MODES, default eager,graph; add compile), a per-stage profile;
#   (b) agreement.{json,md}: `run $AGREE_STRATEGY` on tiny fp32 under --preprocess cpu and device,
#       the share of samples with identical tokens (goal >= 95 %), the rest with their first divergence;
#   (c) four_stage.{json,md}: `run $FOUR_STRATEGY` on synthetic-7b bf16 10^6-event clips under both
#       modes: the four-stage table and the share of Stages 1-3 (last: it is cut first when time runs out);
# plus every run's json/md/log, command.txt, card.txt, summary.md.
# CPU smoke test (no GPU, no carry): SMOKE=1 bash benchmarks/stages_gpu.sh /tmp/stages_smoke
set -uo pipefail
if [ "${1:-}" = park ]; then
  bash benchmarks/gguf_carry.sh park; exit
fi
out=$1; mkdir -p "$out"
stamp=$(date -u +%Y%m%d_%H%M%S)
work=/tmp/stages_gpu_$stamp; mkdir -p "$work"
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then  # toy sizes on this machine's CPU
  PY=${PY:-python}; BIG=tiny; DTYPE=float32; EVENTS=20000; CLIPS=2; REPEATS=1; N=2; N4=2; TOKENS=8; LIMIT=900
  MODES=eager,graph; FOUR_STRATEGY=${FOUR_STRATEGY:-baseline}
else
  bash benchmarks/gguf_carry.sh join || exit 3
  [ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines
  [ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
  export PYTHONPATH=/tmp/site:$PWD EGPT_SPEED_GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf EGPT_SPEED_CACHE=/tmp/cache
  PY=python3; BIG=synthetic-7b; DTYPE=bfloat16; EVENTS=1000000; CLIPS=${CLIPS:-4}; REPEATS=${REPEATS:-3}
  N=${N:-20}; N4=${N4:-10}; TOKENS=64; LIMIT=${LIMIT:-570}; MODES=${MODES:-eager,graph}
fi
AGREE_STRATEGY=${AGREE_STRATEGY:-baseline}; FOUR_STRATEGY=${FOUR_STRATEGY:-compile}
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU (CPU smoke)") \
  | tee "$work/card.txt"
left() { echo $(( LIMIT - SECONDS > 20 ? LIMIT - SECONDS : 20 )); }
step() {  # LABEL COMMAND...: run with the time left, log to work/LABEL.log, record the command
  local label=$1; shift
  echo "$*" >> "$work/command.txt"
  timeout "$(left)" "$@" > "$work/$label.log" 2>&1; local rc=$?
  echo "$label: exit $rc after ${SECONDS}s" | tee -a "$work/summary.md"
}
echo "bash benchmarks/stages_gpu.sh OUT  (SMOKE=${SMOKE:-0}, git $(git rev-parse --short HEAD 2>/dev/null))" > "$work/command.txt"
$PY -c "from egpt_speed.presets import tiny_llm_dir; tiny_llm_dir()"  # convert the GGUF once, outside every timing

# (a) Stages 1-3 of the big model, both preprocess modes, per-stage profile
step stages_bench $PY benchmarks/stages_bench.py --model "$BIG" --dtype "$DTYPE" --events "$EVENTS" --clips "$CLIPS" \
  --repeats "$REPEATS" --warmup 2 --stage3-modes "$MODES" --profile --out "$work"

# (b) tiny fp32: the same strategy under --preprocess cpu and device, token agreement
for mode in cpu device; do
  step "agree_$mode" $PY -m egpt_speed.cli run "$AGREE_STRATEGY" --model tiny --dtype float32 -n "$N" --warmup 2 \
    --max-new-tokens "$TOKENS" --preprocess "$mode" --out "$work/agree_$mode"
done
$PY benchmarks/stages_gpu_tables.py agreement "$(ls "$work"/agree_cpu/*.json | head -1)" \
  "$(ls "$work"/agree_device/*.json | head -1)" "$work/agreement" >> "$work/summary.md" 2>&1

# (c) four-stage table of the big model under both modes
for mode in cpu device; do
  step "four_$mode" $PY -m egpt_speed.cli run "$FOUR_STRATEGY" --model "$BIG" --dtype "$DTYPE" -n "$N4" --warmup 2 \
    --max-new-tokens "$TOKENS" --synthetic-events "$EVENTS" --preprocess "$mode" --compile-mode default \
    --out "$work/four_$mode"
done
$PY benchmarks/stages_gpu_tables.py four-stage "$(ls "$work"/four_cpu/*.json | head -1)" \
  "$(ls "$work"/four_device/*.json | head -1)" "$work/four_stage" >> "$work/summary.md" 2>&1

cat "$work"/stages_bench_*.md >> "$work/summary.md" 2>/dev/null
tar czf "$out/stages_gpu_$stamp.tar.gz" -C /tmp "stages_gpu_$stamp"
cat "$work/summary.md"
echo "wrote $out/stages_gpu_$stamp.tar.gz"
