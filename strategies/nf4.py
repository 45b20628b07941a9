"""`nf4`: the LLM's decoder-layer linears as bitsandbytes 4-bit NormalFloat (double quant, bf16 compute).

A preparer: compose it with any decoder (`nf4+speculative`); alone, baseline decodes. The vision
stack, embeddings and lm_head keep the run's dtype. On an H100 at batch 1, bitsandbytes 4-bit cuts
weight memory ~3× but decodes slower than bf16 (dequantize per matmul): the result shows both.
"""

from __future__ import annotations

from egpt_speed.quantize import BnbPreparer, BnbScheme
from egpt_speed.strategies.registry import Strategy, register


@register
class NF4(BnbPreparer, Strategy):
    name = "nf4"
    summary = "bitsandbytes NF4 4-bit weights for the LLM (double quant, bf16 compute); vision stack unchanged"
    scheme = BnbScheme("nf4")
    kernel = "bitsandbytes 4-bit"
