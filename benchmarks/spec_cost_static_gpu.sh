#!/usr/bin/env bash
# Issue 11 (7B shapes) + issue 13 (Stages 1-3) on the GPU machine. The SmolLM2 GGUF (synthetic-7b's tokenizer)
# travels in three parts (benchmarks/gguf_carry.sh): park .carry1, then .carry1b, then the measuring call:
#   run(carry=[".carry2", ".whl"]): bash benchmarks/spec_cost_static_gpu.sh $OUT [all|quant]
#   all (default): Stages 1-3 bench + spec_cost_static (steps, verifies, heads, int8wo/int4wo)
#   quant: the compiled bf16 step, then int8wo+compile with and without torchao's inductor settings (QUANT=int8wo)
# .whl holds torchao-0.18.0 (int8wo/int4wo). Results land directly in OUT (≤ 8 files come back).
set -uo pipefail
out=$1; what=${2:-all}
bash benchmarks/gguf_carry.sh join || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
[ -e egpt_speed/baselines ] || ln -s ../baselines egpt_speed/baselines  # `pip install .` does not give these there
[ -e egpt_speed/strategies ] || ln -s ../strategies egpt_speed/strategies
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EGPT_SPEED_CACHE=/tmp/cache EGPT_SPEED_GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/card.txt"
echo "bash benchmarks/spec_cost_static_gpu.sh \$OUT $what  # $(git rev-parse --short HEAD 2>/dev/null)" >> "$out/card.txt"
if [ "$what" = quant ]; then
  python3 benchmarks/spec_cost_static.py --model synthetic-7b --dtype bfloat16 --compile-mode default --repeats 30 \
    --quant "${QUANT:-int8wo}" --only-quant --out "$out" > "$out/spec.log" 2>&1
  grep -v Warning "$out/spec.log" | tail -25
  exit
fi
python3 benchmarks/stages_bench.py --model synthetic-7b --dtype bfloat16 --clips 4 --repeats 3 --out "$out" > "$out/stages.log" 2>&1
tail -12 "$out/stages.log"
python3 benchmarks/spec_cost_static.py --model synthetic-7b --dtype bfloat16 --compile-mode default --repeats 30 \
  --tree-nodes 16,32,64 --compiled-tree-nodes 32 --tree-depth 5 --quant int8wo,int4wo --out "$out" > "$out/spec.log" 2>&1
grep -v Warning "$out/spec.log" | tail -45
