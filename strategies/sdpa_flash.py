"""`sdpa-flash`: PyTorch SDPA forced onto its built-in FlashAttention-2 kernel (no flash-attn package needed).

A preparer that registers a transformers attention function running SDPA under
`sdpa_kernel(FLASH_ATTENTION)` (see `egpt_speed.attention`): prefill, one-token steps and
unpadded multi-token verify steps (speculative decoding, as lower-right causal) run on the kernel;
a call it cannot take (a padded batch) fails with one clear error rather than using another kernel.
CUDA, float16/bfloat16 and sm80+ only.
"""

from __future__ import annotations

from egpt_speed.attention import FORCED_FLASH, forced_flash_reason, register_sdpa_variant, set_llm_attention
from egpt_speed.strategies.preparers import FlashAttentionPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class SDPAFlash(FlashAttentionPreparer, Strategy):
    name = "sdpa-flash"
    summary = "LLM attention = PyTorch SDPA forced onto its FlashAttention kernel; fp16/bf16 CUDA; CLIP tower unchanged"
    attn_implementation = FORCED_FLASH

    def unavailable_reason(self) -> str | None:
        return forced_flash_reason(self.ctx.device, self.ctx.dtype)

    def install(self, model) -> None:
        set_llm_attention(model.llm, register_sdpa_variant(FORCED_FLASH, enforce=True))

    def extra_settings(self) -> dict:
        return {"sdpa_backend": "FLASH_ATTENTION (forced)", "multi_token_steps": "lower-right causal on the kernel",
                "padded_batches": "refused"}
