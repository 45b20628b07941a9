"""Shared bodies of preparer strategies that differ only in a few names (mixed into a `Strategy`).

Like `egpt_speed.quantize.BnbPreparer` for the bitsandbytes three: each strategy module stays one
class declaration with its name, summary, refusal and the settings it adds. This module registers
no strategy itself.
"""

from __future__ import annotations

from egpt_speed.attention import attention_settings, check_flash_head_dim, set_llm_attention
from egpt_speed.quantize import KEPT_IN_RUN_DTYPE, quantize_llm_torchao, torchao_settings


class AttentionPreparer:
    """Sets the LLM's attention implementation (eager, sdpa, flex, ...); the CLIP tower keeps its own."""

    attn_implementation: str  # the transformers attention implementation name
    decodes = False
    sets = "the LLM's attention implementation"
    modifies_model = True  # the attention setting lives on the model: compare gives it its own copy

    def install(self, model) -> None:
        set_llm_attention(model.llm, self.attn_implementation)

    def extra_settings(self) -> dict:
        return {}

    def prepare(self, model) -> None:
        self.install(model)
        self.recorded = {**attention_settings(model), **self.extra_settings()}

    def settings(self) -> dict:
        return getattr(self, "recorded", {"attn_implementation": self.attn_implementation})


class FlashAttentionPreparer(AttentionPreparer):
    """Sets the LLM's attention to a FlashAttention implementation after checking its head size."""

    def prepare(self, model) -> None:
        check_flash_head_dim(model.llm.config)
        super().prepare(model)


class TorchaoWeightOnlyPreparer:
    """Quantizes the LLM's decoder-layer linears with the torchao scheme named like the strategy."""

    name: str  # int8wo / int4wo / int4wo-gemlite: also the torchao scheme's key in egpt_speed.quantize (TORCHAO_KINDS)
    decodes = False
    sets = "the LLM's weight format"
    modifies_model = True
    lossless = False

    def prepare(self, model) -> None:
        self.converted = quantize_llm_torchao(model.llm, self.name)

    def settings(self) -> dict:
        return {**torchao_settings(self.name), "quantized_linears": getattr(self, "converted", None),
                "kept_in_run_dtype": KEPT_IN_RUN_DTYPE}
