#!/usr/bin/env bash
# Issue 11: int8 weight-only forms under inductor at 7B linear shapes (benchmarks/int8wo_probe.py), one process per
# variant. run(carry=[".whl"]): bash benchmarks/int8wo_probe_gpu.sh "$OUT"   (.whl holds torchao 0.18.0)
set -uo pipefail
out=$1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/card.txt"
echo "bash benchmarks/int8wo_probe_gpu.sh \$OUT  # $(git rev-parse --short HEAD 2>/dev/null)" > "$out/command.txt"
for v in bf16 torchao torchao-nowoq hand-reduce; do
  timeout 90 python3 benchmarks/int8wo_probe.py --variant $v 2>>"$out/stderr.log" | tee -a "$out/probe.jsonl"
done
for v in torchao-nowoq; do
  timeout 100 python3 benchmarks/int8wo_probe.py --variant $v --mode max-autotune-no-cudagraphs 2>>"$out/stderr.log" \
    | tee -a "$out/probe.jsonl"
done
tail -5 "$out/stderr.log"
