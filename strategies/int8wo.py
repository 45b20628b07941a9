"""`int8wo`: torchao int8 weight-only quantization of the LLM's decoder-layer linears (per-channel scales).

A preparer, applied with `quantize_` after loading (transformers 5.17's `TorchAoConfig` path fails
on a weight conversion). Eager decoding dequantizes per matmul; the large win comes with a compiled
static-cache decoder (`int8wo+compile`).
"""

from __future__ import annotations

from egpt_speed.quantize import cuda_reason, package_reason
from egpt_speed.strategies.preparers import TorchaoWeightOnlyPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class Int8WeightOnly(TorchaoWeightOnlyPreparer, Strategy):
    name = "int8wo"
    summary = "torchao int8 weight-only LLM linears (per-channel scales); vision stack unchanged"

    def unavailable_reason(self) -> str | None:
        return cuda_reason(self.ctx.device, "torchao int8 weight-only") or package_reason("torchao", "torchao")
