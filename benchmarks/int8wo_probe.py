"""Issue 11: why int8wo+compile costs 51 ms/token at 7B, and which int8 weight-only form inductor compiles well.

    python benchmarks/int8wo_probe.py --variant V [--rows 1,5] [--layers 4] [--mode M]   # GPU; one variant per process
    for v in bf16 torchao torchao-nowoq hand-reduce; do python benchmarks/int8wo_probe.py --variant $v; done

One process per variant because inductor registers its pattern passes once per process. The workload is the 7
linears of `--layers` Llama-7B decoder layers (4096 wide, MLP 11008) chained x -> q,k,v,o,gate,up,down, compiled
(default mode) under the inductor settings `compile` uses for a torchao LLM (quantize.TORCHAO_INDUCTOR_CONFIG),
captured in a CUDA graph and replayed; prints one JSON line per row count with the median µs per replay, the weight
bytes read per µs and how many matmuls inductor's weight-only-int8 pattern rewrote. (The 2026-12-03 results were
taken with coordinate-descent tuning alone and without the rewrite count.)

Variants:
- bf16: plain bf16 linears (the reference).
- torchao: torchao Int8WeightOnlyConfig (what `int8wo` does). Inductor's weight-only-int8 pattern
  (torch/_inductor/fx_passes/quantization.py, `mm(x, w.to(bf16)) * scales`) rewrites it to aten._weight_int8pack_mm.
- torchao-nowoq: the same with that pattern's registration switched off before the first compile.
- hand-reduce: int8 weight + bf16 per-row scale, forward written as a multiply-and-sum over K for few rows (inductor
  emits one reduction kernel reading int8 directly) and as dequantize-then-GEMM for many.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, MLP = 4096, 11008
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]  # q k v o gate up down: (out, in)


class Int8Linear(nn.Module):
    """int8 weight, bf16 per-output-row scale; few rows: one fused reduction, many rows: dequantize + GEMM."""

    def __init__(self, linear: nn.Linear, reduce_rows: int = 8):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.reduce_rows = reduce_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= self.reduce_rows:
            return (x.unsqueeze(-2) * self.qweight.to(x.dtype)).sum(-1) * self.scale
        return F.linear(x, self.qweight.to(x.dtype) * self.scale[:, None])


def chain(layers: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(i, o, bias=False) for _ in range(layers) for o, i in SHAPES)


def forward(linears: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Per layer: o(q(x) + k(x) + v(x)), then down(silu(gate(h)) * up(h)) + h (shapes and dependencies of a layer)."""
    for first in range(0, len(linears), len(SHAPES)):
        q, k, v, o, gate, up, down = linears[first:first + len(SHAPES)]
        h = o(q(x) + k(x) + v(x))
        x = down(F.silu(gate(h)) * up(h)) + h
    return x


def switch_off_woq_pattern() -> None:
    from torch._inductor.fx_passes import mkldnn_fusion, quantization
    quantization._register_woq_lowerings = lambda: None
    mkldnn_fusion._register_woq_lowerings = lambda: None


def build(variant: str, layers: int) -> nn.ModuleList:
    linears = chain(layers).to("cuda", torch.bfloat16)
    if variant.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        quantize_(linears, Int8WeightOnlyConfig(set_inductor_config=False))
    elif variant == "hand-reduce":
        for index in range(len(linears)):
            linears[index] = Int8Linear(linears[index])
    return linears


def time_replays(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def measure(variant: str, rows: int, layers: int, mode: str, batch_dim: bool = False, show: bool = False) -> dict:
    linears = build(variant, layers)
    step = torch.compile(lambda x: forward(linears, x), mode=mode, dynamic=False)
    x = torch.randn(*((1,) if batch_dim else ()), rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the weights and x were made on the default stream
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            step(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        step(x)
    us = time_replays(graph)
    if show:
        from spec_cost_static import cuda_kernel_table  # benchmarks/, this script's folder
        print(cuda_kernel_table(graph.replay, x.device, calls=1, rows=4), flush=True)
    weight_bytes = sum(o * i for o, i in SHAPES) * layers * (2 if variant == "bf16" else 1)
    from torch._dynamo.utils import counters
    return {"variant": variant, "mode": mode, "input": list(x.shape), "rows": rows,
            "woq_rewrites": counters["inductor"]["woq_matcher_count"],  # inductor's int8 pattern → _weight_int8pack_mm
            "layers": layers, "us": round(us, 1),
            "weight_GB_per_s": round(weight_bytes / us / 1e3, 1), "device": torch.cuda.get_device_name()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True, choices=["bf16", "torchao", "torchao-nowoq", "hand-reduce"])
    parser.add_argument("--rows", default="1,5")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mode", default="default", help="torch.compile mode (max-autotune-no-cudagraphs: Triton GEMM templates)")
    parser.add_argument("--batch-dim", action="store_true", help="inputs [1, rows, 4096] as in the decoder ([rows, 4096] else)")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one replay")
    args = parser.parse_args()
    if args.variant == "torchao-nowoq":
        switch_off_woq_pattern()
    from egpt_speed.quantize import TORCHAO_INDUCTOR_CONFIG  # the settings `compile` uses for a torchao LLM
    for key, value in TORCHAO_INDUCTOR_CONFIG.items():
        setattr(torch._inductor.config, key, value)
    for rows in (int(r) for r in args.rows.split(",")):
        print(json.dumps(measure(args.variant, rows, args.layers, args.mode, args.batch_dim, args.profile)), flush=True)


if __name__ == "__main__":
    main()
