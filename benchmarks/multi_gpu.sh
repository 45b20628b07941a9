#!/usr/bin/env bash
# Issue 15 on a 2-GPU machine (kind nvidia-h200-x2): the same `compare` on 1 GPU and under
# `torchrun --nproc-per-node 2`, in one call. The SmolLM2 GGUF (98 MB) travels in three parts (benchmarks/gguf_carry.sh):
#   1. run(carry=[".carry1"]):  bash benchmarks/multi_gpu.sh park        # parks .carry1/part00 in /tmp/gguf
#   1b. the same with carry=[".carry1b"] right after (the GGUF travels in three parts: benchmarks/gguf_carry.sh)
#   2. run(carry=[".carry2"]):  bash benchmarks/multi_gpu.sh "$OUT"      # joins it, runs both, writes to OUT
# (the machine must stay warm between the two calls). OUT receives both results (json + md), each run's
# log, command.txt, card.txt and table.md: wall-clock samples/s of both runs and their ratio, whether
# the merged token ids equal the 1-GPU ones, and per-candidate median speedups of both runs.
set -uo pipefail
if [ "${1:-}" = park ]; then
  bash benchmarks/gguf_carry.sh park; exit
fi
out=$1
N=${N:-40}
bash benchmarks/gguf_carry.sh join || exit 3
[ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines
[ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
export PYTHONPATH=/tmp/site:$PWD EGPT_SPEED_GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf EGPT_SPEED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee "$out/card.txt"
args=(compare baseline speculative eagle-tree --model tiny --dtype float32 -n "$N" --warmup 3 --max-new-tokens 64)
mkdir -p /tmp/res/one /tmp/res/two
python3 -c "from egpt_speed.presets import tiny_llm_dir; tiny_llm_dir()"  # convert once, outside both timings
{ echo "CUDA_VISIBLE_DEVICES=0 python3 -m egpt_speed.cli ${args[*]} --out one"
  echo "python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m egpt_speed.cli ${args[*]} --out two"; } > "$out/command.txt"
timed() {  # LABEL COMMAND...: run, log, record wall seconds
  local label=$1; shift
  local start=$(date +%s.%N)
  "$@" > "$out/$label.log" 2>&1; echo "$label exit $?"
  python3 -c "print($(date +%s.%N) - $start)" > "/tmp/res/$label.wall"
}
timed one env CUDA_VISIBLE_DEVICES=0 python3 -m egpt_speed.cli "${args[@]}" --out /tmp/res/one
timed two python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m egpt_speed.cli "${args[@]}" --out /tmp/res/two
cp /tmp/res/one/*.json /tmp/res/one/*.md "$out/" 2>/dev/null
mkdir -p "$out/two" && cp /tmp/res/two/*.json /tmp/res/two/*.md "$out/two/" 2>/dev/null
python3 - "$out" "$N" <<'EOF' | tee "$out/table.md"
import json, pathlib, statistics, sys
out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def merged(d):
    return json.loads(next(p for p in sorted(pathlib.Path(d).glob("compare_*.json")) if "_shard" not in p.name).read_text())
one, two = merged("/tmp/res/one"), merged("/tmp/res/two")
wall = {k: float(pathlib.Path(f"/tmp/res/{k}.wall").read_text()) for k in ("one", "two")}
tokens = lambda doc: {k: [s["token_ids"] for s in r["samples"]] for k, r in doc["runs"].items()}
print(f"| run | wall s | samples/s | devices |\n|---|---:|---:|---|")
for k, doc in (("one", one), ("two", two)):
    print(f"| {'1 GPU' if k == 'one' else 'torchrun 2 GPUs'} | {wall[k]:.1f} | {n / wall[k]:.3f} | {doc['env']['device']} |")
print(f"\nsamples/s ratio (2 GPUs / 1 GPU, wall clock incl. load and warm-up): {wall['one'] / wall['two']:.2f}x")
def work_s(doc, ranks):  # per rank: Σ over its samples of Stages 1-3 once + every strategy's Stage 4
    runs = list(doc["runs"].values())
    per = [0.0] * ranks
    for i in range(len(runs[0]["samples"])):
        first = runs[0]["samples"][i]
        per[i % ranks] += (first["stage1_ms"] + first["stage2_ms"] + first["stage3_ms"]
                           + sum(r["samples"][i]["stage4_ms"] for r in runs)) / 1e3
    return max(per)
print(f"samples/s ratio over the measured samples only (1 GPU's work / slowest rank's): "
      f"{work_s(one, 1) / work_s(two, 2):.2f}x ({work_s(one, 1):.1f} s vs {work_s(two, 2):.1f} s)")
print(f"merged token ids identical to the 1-GPU run: {tokens(one) == tokens(two)}")
print("\n| candidate | 1 GPU S4 speedup median [IQR] | 2 GPUs | exact 1 / 2 | median |per-sample diff| |\n|---|---|---|---|---:|")
for c1, c2 in zip(one["comparisons"], two["comparisons"]):
    diffs = [abs(a["speedup_stage4"] - b["speedup_stage4"]) for a, b in zip(c1["per_sample"], c2["per_sample"])]
    fmt = lambda c: f"{c['speedup_stage4_median']:.2f}x [{c['speedup_stage4_q1']:.2f}-{c['speedup_stage4_q3']:.2f}]"
    print(f"| {c1['candidate']} | {fmt(c1)} | {fmt(c2)} | {c1['exact_match_rate']:.0%} / {c2['exact_match_rate']:.0%} | "
          f"{statistics.median(diffs):.3f} |")
EOF
