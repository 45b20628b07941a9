"""`eager`: the LLM's attention as transformers' plain PyTorch implementation (matmul + softmax).

A preparer: the reference point below SDPA. Only the LLM is switched; the CLIP tower keeps its own.
"""

from __future__ import annotations

from egpt_speed.attention import attention_settings, set_llm_attention
from egpt_speed.strategies.registry import Strategy, register


@register
class EagerAttention(Strategy):
    name = "eager"
    summary = "LLM attention = transformers eager (matmul + softmax); CLIP tower unchanged"
    decodes = False
    sets = "the LLM's attention implementation"
    modifies_model = True  # the attention setting lives on the model: compare gives it its own copy

    def prepare(self, model) -> None:
        set_llm_attention(model.llm, "eager")
        self.recorded = attention_settings(model)

    def settings(self) -> dict:
        return getattr(self, "recorded", {"attn_implementation": "eager"})
