"""`flash-attn`: the LLM's attention as `attn_implementation="flash_attention_2"` (the flash-attn package).

Needs the `flash_attn` package, which has no PyPI wheel (it builds from source against the local
CUDA); without it this refuses — `sdpa-flash` runs PyTorch's own FlashAttention-2 kernel instead.
flash-attn-4 (a pure-Python CuTe-DSL wheel) installs into the same `flash_attn` import name without
FlashAttention-2's API, so the check is for the flash-attn distribution, not the import name: with only FA4 installed
transformers' flash_attention_2 would fail after the model loaded.
transformers' fallback to the `kernels` hub package is not used: it downloads at run time.
"""

from __future__ import annotations

import importlib.util

from egpt_speed.attention import half_precision_cuda_reason
from egpt_speed.quantize import package_version
from egpt_speed.strategies.preparers import FlashAttentionPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class FlashAttn(FlashAttentionPreparer, Strategy):
    name = "flash-attn"
    summary = "LLM attention = flash_attention_2 from the flash-attn package; fp16/bf16 CUDA; CLIP tower unchanged"
    attn_implementation = "flash_attention_2"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("flash_attn") is None or package_version("flash-attn") is None:
            fa4 = package_version("flash-attn-4")
            found = f" (flash-attn-4 {fa4} is installed, but it is not FlashAttention-2)" if fa4 else ""
            return (f"needs the flash_attn package{found} (pip install flash-attn, a source build); "
                    "sdpa-flash runs PyTorch's own FlashAttention kernel without it.")
        return half_precision_cuda_reason(self.ctx.device, self.ctx.dtype, "flash_attention_2")

    def extra_settings(self) -> dict:
        return {"flash_attn": package_version("flash-attn")}
