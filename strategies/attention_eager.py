"""`eager`: the LLM's attention as transformers' plain PyTorch implementation (matmul + softmax).

A preparer: the reference point below SDPA. Only the LLM is switched; the CLIP tower keeps its own.
"""

from __future__ import annotations

from egpt_speed.strategies.preparers import AttentionPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class EagerAttention(AttentionPreparer, Strategy):
    name = "eager"
    summary = "LLM attention = transformers eager (matmul + softmax); CLIP tower unchanged"
    attn_implementation = "eager"
