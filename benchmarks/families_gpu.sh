#!/usr/bin/env bash
# Issue 17 items 2-3 on one GPU: the four-stage table of EventGPT-7B vs LLaVA-1.5-7B vs Video-LLaVA-7B shapes
# (`run baseline` on synthetic-7b, synthetic-llava-7b, synthetic-video-llava-7b: random weights, bf16) and a
# tiny fp32 cross-modal speculative run both ways (EventGPT `tiny` draft -> `tiny-video-llava` target and
# the reverse; both share SmolLM2-135M's real weights), merged by benchmarks/families_table.py.
# The SmolLM2 GGUF (the presets' tokenizer) travels in three parts (benchmarks/gguf_carry.sh):
#   1. run(carry=[".carry1"]):  bash benchmarks/families_gpu.sh park
#   1b. the same with carry=[".carry1b"] right after (the GGUF travels in three parts: benchmarks/gguf_carry.sh)
#   2. run(carry=[".carry2"]):  bash benchmarks/families_gpu.sh "$OUT"
# OUT receives ONE file, families_<stamp>.tar.gz (every result json + md, logs, command.txt, card.txt,
# table.md, families.json); table.md is printed last.
# CPU smoke at toy size (no GGUF join, no GPU): SMOKE=1 bash benchmarks/families_gpu.sh /tmp/out
set -uo pipefail
if [ "${1:-}" = park ]; then
  bash benchmarks/gguf_carry.sh park; exit
fi
out=$1
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then  # toy size on the CPU: the LLaVA presets' tiny siblings stand in for the 7B ones
  models=(tiny tiny-llava tiny-video-llava); dtype=float32; N=${N:-1}; W=${W:-0}; NX=${NX:-1}; XW=${XW:-0}; TOKENS=${TOKENS:-6}
  device=(--device cpu); py=python
else
  models=(synthetic-7b synthetic-llava-7b synthetic-video-llava-7b); dtype=bfloat16
  N=${N:-5}; W=${W:-2}; NX=${NX:-10}; XW=${XW:-2}; TOKENS=${TOKENS:-64}; device=(--device cuda); py=python3
  bash benchmarks/gguf_carry.sh join || exit 3
  [ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines
  [ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
  export PYTHONPATH=/tmp/site:$PWD EGPT_SPEED_GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf EGPT_SPEED_CACHE=/tmp/cache
fi
res=$(mktemp -d /tmp/families.XXXX)
mkdir -p "$res/stages" "$res/cross"
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU (smoke)"; } | tee "$res/card.txt"
$py -c "from egpt_speed.presets import tiny_llm_dir; tiny_llm_dir()"  # convert the GGUF once, outside every timing
: > "$res/command.txt"
cli() {  # LOG ARGS...: one egpt-speed command, recorded and logged
  local log=$1; shift
  echo "$py -m egpt_speed.cli $*" | tee -a "$res/command.txt"
  $py -m egpt_speed.cli "$@" > "$res/$log.log" 2>&1; echo "$log exit $?"
}
PART=${PART:-all}  # stages | cross | all: split over two calls if one would pass the 10-minute limit
for model in "${models[@]}"; do
  [ "$PART" = cross ] && break
  cli "run_$model" run baseline --model "$model" --dtype "$dtype" "${device[@]}" -n "$N" --warmup "$W" \
    --max-new-tokens "$TOKENS" --out "$res/stages"
done
xm=(--dtype float32 "${device[@]}" -n "$NX" --warmup "$XW" --max-new-tokens "$TOKENS" --gamma 4)
[ "$PART" = stages ] && NX=0
[ "$NX" -gt 0 ] && cli xm_video_target compare baseline speculative --model tiny-video-llava --draft tiny "${xm[@]}" --out "$res/cross/video_target"
# the reverse reads the video frames the first run wrote (the runner adds them to synthetic data for LLaVA targets only)
data=$(ls -d "${EGPT_SPEED_CACHE:-$HOME/.cache/egpt-speed}"/synthetic/synthetic_v*_n$((NX + XW))_s0_*_video 2>/dev/null | head -1)
[ "$NX" -gt 0 ] && cli xm_eventgpt_target compare baseline speculative --model tiny --draft tiny-video-llava --data "${data:-missing}" \
  "${xm[@]}" --out "$res/cross/eventgpt_target"
$py benchmarks/families_table.py "$res" --runs $(ls "$res"/stages/baseline_*.json 2>/dev/null) \
  --cross $(ls "$res"/cross/*/compare_*.json 2>/dev/null) > /dev/null
stamp=$(date -u +%Y%m%d_%H%M%S)
tar czf "$out/families_$stamp.tar.gz" -C "$res" .
ls -la "$out"
cat "$res/table.md"
