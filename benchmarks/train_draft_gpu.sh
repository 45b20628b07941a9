#!/usr/bin/env bash
# Issue 16 items 2-3 on one GPU (kind nvidia-h200), in up to five calls on one warm machine:
#   1. run(carry=[".carry1"]):  bash benchmarks/train_draft_gpu.sh park-gguf      # SmolLM2 GGUF part 1 → /tmp/gguf
#   1b. the same with carry=[".carry1b"] right after (the GGUF travels in three parts: benchmarks/gguf_carry.sh)
#   2. run(carry=[".carry3"]):  bash benchmarks/train_draft_gpu.sh park-bnb       # bitsandbytes 0.50.2 wheel → /tmp/site
#   3. run(carry=[".carry2"]):  bash benchmarks/train_draft_gpu.sh heads "$OUT"   # tiny, shipped recipe: the eagle head, vs 0.708
#   3b. run():                  bash benchmarks/train_draft_gpu.sh heads3 "$OUT"  # the same answers (cached), the eagle3 head
#   3c. run(carry=[".carry2"]): bash benchmarks/train_draft_gpu.sh ttt "$OUT"     # eagle vs eagle3:3 at 1,000 answers (fixed TTT mask)
#   4. run():                   bash benchmarks/train_draft_gpu.sh nf4 "$OUT"     # tiny: heads trained on a bf16 vs an nf4 target
#   5. run():                   bash benchmarks/train_draft_gpu.sh cost7b "$OUT"  # synthetic-7b: collection/epoch cost, bf16 vs nf4
#   5b. run():                  bash benchmarks/train_draft_gpu.sh cost7b3 "$OUT" # the same for the EAGLE-3 head, --unroll 3 (bf16)
# .carry1/.carry1b/.carry2 are benchmarks/gguf_carry.sh's parts of the GGUF (+ the gguf wheel); .carry3 holds
# bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl (pip download, see shared GPU.md). Each measuring call
# writes ONE tarball, $OUT/<mode>.tar.gz: result json + md, the log, command.txt and card.txt; its python runs
# under a timeout that leaves time for the tarball, and the results are rewritten after every head, so a
# cut-off run still returns what it measured.
set -uo pipefail
mode=${1:-}
gguf=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
case $mode in
  park-gguf) bash benchmarks/gguf_carry.sh park; exit ;;
  park-bnb) python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry3/*.whl && ls /tmp/site; exit ;;
  heads|heads3|ttt|nf4|cost7b|cost7b3) ;;
  *) echo "usage: $0 park-gguf | park-bnb | heads OUT | heads3 OUT | ttt OUT | nf4 OUT | cost7b OUT | cost7b3 OUT"; exit 2 ;;
esac
out=$2
bash benchmarks/gguf_carry.sh join || exit 3  # the first measuring call carries .carry2; later ones find the joined file
[ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines
[ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
export PYTHONPATH=/tmp/site:$PWD EGPT_SPEED_GGUF=$gguf EGPT_SPEED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
res=/tmp/res/$mode && rm -rf "$res" && mkdir -p "$res"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv > "$res/card.txt"
python3 -c "import bitsandbytes, torch; print('bitsandbytes', bitsandbytes.__version__, 'torch', torch.__version__)" >> "$res/card.txt" 2>&1
python3 -c "from egpt_speed.presets import tiny_llm_dir; tiny_llm_dir()"  # convert once, outside every timing
step() {  # SECONDS COMMAND...: run under a timeout, log, record the command
  local limit=$1; shift
  echo "$*" >> "$res/command.txt"
  timeout "$limit" "$@" --out "$res" >> "$res/log.txt" 2>&1; echo "exit $? after: $*" | tee -a "$res/log.txt"
}
case $mode in
  heads|heads3)  # the shipped head's recipe (4,000 + 800 answers, 64 tokens, 6 epochs, 8,192 ids), trained online;
    # one head per call, the answers cached in /tmp/answers by the first call (one call for all three passed 390 s).
    # heads3 on a fresh machine does not fit one call: collection ~185 s + EAGLE-3 training ~245 s + tau was cut at
    # 540 s (2026-12-03); the same call again on the warm machine, answers cached, took 345 s
    variant=eagle:1; [ "$mode" = heads3 ] && variant=eagle3:3
    step 540 python3 benchmarks/draft_heads.py --model tiny --answers 4000 --new-tokens 64 --epochs 6 --batch-size 64 \
      --variants $variant --train-targets float32 --tau-prompts 20 --device cuda --answers-cache /tmp/answers \
      --save "$res/head" ;;  # the trained head comes back in the tarball (bf16, ~10 MB for eagle3): shippable as tiny-eagle
  ttt)  # both styles at equal data, a quarter of the shipped recipe, after the training-time-test mask fix
    step 300 python3 benchmarks/draft_heads.py --model tiny --answers 1000 --new-tokens 64 --epochs 6 --batch-size 64 \
      --variants eagle3:3 eagle:1 --train-targets float32 --tau-prompts 10 --device cuda ;;
  nf4)  # the same head trained on a bf16 and on an nf4 target, both judged against the float32 target
    step 540 python3 benchmarks/draft_heads.py --model tiny --answers 1000 --new-tokens 64 --epochs 6 --batch-size 64 \
      --variants eagle:1 --train-targets bfloat16 bfloat16+nf4 --tau-prompts 20 --device cuda ;;
  cost7b)  # collection batch 8 (fits 24 GB at 512 tokens in bf16, per the 27.5 / 34.3 GB seen at batch 32)
    step 250 python3 benchmarks/train_draft_7b.py --model synthetic-7b --dtype bfloat16 --answers 32 --new-tokens 64 512 \
      --batch-size 8 --train-batch 4 --device cuda
    step 300 python3 benchmarks/train_draft_7b.py --model synthetic-7b --dtype bfloat16 --target-quant nf4 --answers 32 \
      --new-tokens 64 512 --batch-size 8 --train-batch 4 --device cuda ;;
  cost7b3)  # is the EAGLE-3 head (3 fused layers, 3 training-time-test steps) still inside 24 GB at 7B?
    step 500 python3 benchmarks/train_draft_7b.py --model synthetic-7b --dtype bfloat16 --answers 32 --new-tokens 64 512 \
      --batch-size 8 --train-batch 4 --head-style eagle3 --unroll 3 --device cuda ;;
esac
tail -n 30 "$res/log.txt"
cat "$res"/*.md 2>/dev/null
tar -czf "$out/$mode.tar.gz" -C /tmp/res "$mode" && echo "wrote $out/$mode.tar.gz"
