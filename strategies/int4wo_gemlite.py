"""`int4wo-gemlite`: torchao int4 weight-only (group 128, HQQ) on GemLite's Triton kernels, the LLM's decoder-layer linears.

A preparer like `int4wo`, whose tinygemm kernel (`aten._weight_int4pack_mm`) reads a 7B model's 4.0 GB of int4
weights at ~1.2 TB/s at one row (3.29 ms a token on the H200 against a goal of 1.8 ms). GemLite
(`pip install gemlite`, pure Python + Triton) packs the weights for its own GEMV/GEMM kernels, exposed as a torch
custom op that `compile` keeps inside the compiled, captured step. Quantized by HQQ (torchao's choice for this
config), so its tokens differ from `int4wo`'s as well as from the bf16 baseline's: compare reports the agreement.

torchao 0.18 needs gemlite < 0.6 (0.5.1.post1 on the H200 run): gemlite 0.6 returns four packed tensors (it added a
meta scale) where torchao's UIntxBitPackedTensor unpacks three, and quantizing failed with "too many values to unpack
(expected 3)" after the model had loaded. With gemlite 0.5.1.post1 the weights pack, but torchao's HQQ quantizer
returns float16 scales whatever the model's dtype, GemLite takes its kernel dtype from them, and a bfloat16 forward
failed to compile in Triton ("Both operands must be same dtype. Got bf16 and fp16"): float16 only
(benchmarks/results/issue11_h200_20261203_s8/).
"""

from __future__ import annotations

import torch

from packaging.version import InvalidVersion, Version

from egpt_speed.quantize import cuda_reason, package_reason, package_version
from egpt_speed.strategies.preparers import TorchaoWeightOnlyPreparer
from egpt_speed.strategies.registry import Strategy, register

NEWEST_TORCHAO_WITH_THREE_GEMLITE_TENSORS = (0, 18)  # release (major, minor), pre-releases included
FIRST_GEMLITE_WITH_FOUR_TENSORS = (0, 6)


def _release(version: str | None) -> tuple[int, ...] | None:
    try:
        return Version(version).release[:2] if version else None
    except InvalidVersion:
        return None


def version_mismatch_reason() -> str | None:
    """torchao ≤ 0.18 with gemlite ≥ 0.6: a clear refusal before the model loads instead of torchao's unpack error."""
    torchao, gemlite = package_version("torchao"), package_version("gemlite")
    torchao_release, gemlite_release = _release(torchao), _release(gemlite)
    if torchao_release is None or gemlite_release is None:
        return None
    if torchao_release <= NEWEST_TORCHAO_WITH_THREE_GEMLITE_TENSORS and gemlite_release >= FIRST_GEMLITE_WITH_FOUR_TENSORS:
        return (f"torchao {torchao} cannot pack weights with gemlite {gemlite} (gemlite 0.6 changed the packed tensors "
                f"torchao 0.18 reads); pip install 'gemlite<0.6'.")
    return None


@register
class Int4WeightOnlyGemlite(TorchaoWeightOnlyPreparer, Strategy):
    name = "int4wo-gemlite"
    summary = "torchao int4 weight-only LLM linears on GemLite Triton kernels (group 128, HQQ); float16; vision stack unchanged"

    def unavailable_reason(self) -> str | None:
        reason = (cuda_reason(self.ctx.device, "torchao int4 weight-only (GemLite)") or package_reason("torchao", "torchao")
                  or package_reason("gemlite", "gemlite") or version_mismatch_reason())
        if reason:
            return reason
        if self.ctx.dtype != torch.float16:
            return (f"torchao packs GemLite's int4 weights with float16 scales, so its kernels take float16 activations "
                    f"(this run is {str(self.ctx.dtype).replace('torch.', '')}); run with --dtype float16.")
        return None
