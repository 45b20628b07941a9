"""`int4wo`: torchao int4 weight-only quantization (group 128, tinygemm packing) of the LLM's decoder-layer linears.

A preparer. torchao 0.18's default int4 packing needs the `mslk` kernels (PyPI has only an empty
placeholder), so this asks for the "tile_packed_to_4d" packing, whose `_weight_int4pack_mm` kernel
ships inside PyTorch: CUDA, bfloat16 and compute capability 8.0+ only.
"""

from __future__ import annotations

import torch

from egpt_speed.quantize import cuda_reason, package_reason
from egpt_speed.strategies.preparers import TorchaoWeightOnlyPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class Int4WeightOnly(TorchaoWeightOnlyPreparer, Strategy):
    name = "int4wo"
    summary = "torchao int4 weight-only LLM linears (group 128, tinygemm); bf16 on sm80+; vision stack unchanged"

    def unavailable_reason(self) -> str | None:
        reason = cuda_reason(self.ctx.device, "torchao int4 weight-only") or package_reason("torchao", "torchao")
        if reason:
            return reason
        if self.ctx.dtype != torch.bfloat16:
            return (f"the tinygemm int4 kernel takes bfloat16 weights only (this run is {str(self.ctx.dtype).replace('torch.', '')}); "
                    "run with --dtype bfloat16.")
        if torch.cuda.is_available() and torch.cuda.get_device_capability(self.ctx.device)[0] < 8:
            return "the tinygemm int4 kernel needs a GPU of compute capability 8.0 or newer (Ampere, Hopper)."
        return None
