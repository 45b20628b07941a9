"""`sdpa`: the LLM's attention as PyTorch `scaled_dot_product_attention`, kernel chosen by PyTorch.

transformers' default; as a strategy it states the choice explicitly (and undoes a checkpoint's
own setting). Only the LLM is switched.
"""

from __future__ import annotations

from egpt_speed.attention import attention_settings, set_llm_attention
from egpt_speed.strategies.registry import Strategy, register


@register
class SDPA(Strategy):
    name = "sdpa"
    summary = "LLM attention = PyTorch SDPA, PyTorch picks the kernel; CLIP tower unchanged"
    decodes = False
    sets = "the LLM's attention implementation"
    modifies_model = True

    def prepare(self, model) -> None:
        set_llm_attention(model.llm, "sdpa")
        self.recorded = attention_settings(model)

    def settings(self) -> dict:
        return getattr(self, "recorded", {"attn_implementation": "sdpa"})
