"""`int8`: the LLM's decoder-layer linears as bitsandbytes LLM.int8 (outlier threshold 6.0).

A preparer. LLM.int8 halves weight memory but its mixed-precision matmul is slow at batch 1
(on an H100 ~4× the bf16 per-token time): measured, not assumed.
"""

from __future__ import annotations

from egpt_speed.quantize import BnbPreparer, BnbScheme
from egpt_speed.strategies.registry import Strategy, register


@register
class Int8(BnbPreparer, Strategy):
    name = "int8"
    summary = "bitsandbytes LLM.int8 weights for the LLM (outlier threshold 6.0); vision stack unchanged"
    scheme = BnbScheme("int8")
    kernel = "bitsandbytes LLM.int8"
