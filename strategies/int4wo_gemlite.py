"""`int4wo-gemlite`: torchao int4 weight-only (group 128, HQQ) on GemLite's Triton kernels, the LLM's decoder-layer linears.

A preparer like `int4wo`, whose tinygemm kernel (`aten._weight_int4pack_mm`) reads a 7B model's 4.0 GB of int4
weights at ~1.2 TB/s at one row (3.29 ms a token on the H200 against a goal of 1.8 ms). GemLite
(`pip install gemlite`, pure Python + Triton) packs the weights for its own GEMV/GEMM kernels, exposed as a torch
custom op that `compile` keeps inside the compiled, captured step. Quantized by HQQ (torchao's choice for this
config), so its tokens differ from `int4wo`'s as well as from the bf16 baseline's: compare reports the agreement.
"""

from __future__ import annotations

import torch

from egpt_speed.quantize import cuda_reason, package_reason
from egpt_speed.strategies.preparers import TorchaoWeightOnlyPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class Int4WeightOnlyGemlite(TorchaoWeightOnlyPreparer, Strategy):
    name = "int4wo-gemlite"
    summary = "torchao int4 weight-only LLM linears on GemLite Triton kernels (group 128, HQQ); bf16/fp16; vision stack unchanged"

    def unavailable_reason(self) -> str | None:
        reason = (cuda_reason(self.ctx.device, "torchao int4 weight-only (GemLite)") or package_reason("torchao", "torchao")
                  or package_reason("gemlite", "gemlite"))
        if reason:
            return reason
        if self.ctx.dtype not in (torch.bfloat16, torch.float16):
            return (f"GemLite's int4 kernels take bfloat16 or float16 activations (this run is "
                    f"{str(self.ctx.dtype).replace('torch.', '')}); run with --dtype bfloat16.")
        return None
