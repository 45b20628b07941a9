"""`sdpa`: the LLM's attention as PyTorch `scaled_dot_product_attention`, kernel chosen by PyTorch.

transformers' default; as a strategy it states the choice explicitly (and undoes a checkpoint's
own setting). Only the LLM is switched.
"""

from __future__ import annotations

from egpt_speed.strategies.preparers import AttentionPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class SDPA(AttentionPreparer, Strategy):
    name = "sdpa"
    summary = "LLM attention = PyTorch SDPA, PyTorch picks the kernel; CLIP tower unchanged"
    attn_implementation = "sdpa"
