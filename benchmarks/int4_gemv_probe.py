"""One-row int4 weight-only matmuls at Llama-7B's linear shapes, GemLite against tinygemm and the dense matmul
(issue 11's int4 goal: ≤ 1.8 ms a token at 7B, where `int4wo+compile` took 3.29 ms on the H200 because tinygemm's
GEMV read at ~1.2 TB/s). Each linear alone, quantized the way its strategy does (egpt_speed.quantize), one call
replayed in a CUDA graph: the kernels' own speed, no model and no tokenizer (the GGUF need not travel).

    python3 benchmarks/int4_gemv_probe.py --out DIR [--kinds dense,int4wo,int4wo-gemlite]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from attention_probe import replay_us  # noqa: E402
from egpt_speed.quantize import INT4_GROUP_SIZE, torchao_config  # noqa: E402

# (out, in, linears of this shape in one Llama-7B decoder layer): q/k/v/o, gate/up, down
SHAPES = ((4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1))
LAYERS = 32
DTYPE_OF = {"dense": torch.float16, "int4wo": torch.bfloat16, "int4wo-gemlite": torch.float16}


def weight_bytes(kind: str, out_features: int, in_features: int) -> int:
    if kind == "dense":
        return out_features * in_features * 2
    return out_features * in_features // 2 + 2 * 2 * out_features * (in_features // INT4_GROUP_SIZE)  # + scale, zero


def linear_us(kind: str, out_features: int, in_features: int) -> float:
    dtype = DTYPE_OF[kind]
    linear = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=dtype)
    if kind != "dense":
        from torchao.quantization import quantize_
        quantize_(linear, torchao_config(kind))
    x = torch.randn(1, in_features, device="cuda", dtype=dtype)
    with torch.inference_mode():
        return replay_us(lambda: linear(x))


def measure(kind: str) -> dict:
    started = time.perf_counter()
    rows, layer_us = [], 0.0
    for out_features, in_features, count in SHAPES:
        us = linear_us(kind, out_features, in_features)
        layer_us += us * count
        rows.append({"shape": f"{out_features}x{in_features}", "us": round(us, 2),
                     "tb_s": round(weight_bytes(kind, out_features, in_features) / us / 1e6, 3)})
    return {"kind": kind, "dtype": str(DTYPE_OF[kind]).replace("torch.", ""), "shapes": rows,
            "decoder_ms_per_token": round(layer_us * LAYERS / 1000, 3), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", default="dense,int4wo,int4wo-gemlite")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("torch", torch.__version__, torch.cuda.get_device_name())
    results = []
    for kind in args.kinds.split(","):
        try:
            results.append(measure(kind))
        except Exception as error:  # noqa: BLE001 - a kind that fails is a result
            results.append({"kind": kind, "error": f"{type(error).__name__}: {error}"[:400]})
        print(json.dumps(results[-1]), flush=True)
        (args.out / "int4_gemv_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                   "results": results}, indent=1))


if __name__ == "__main__":
    main()
