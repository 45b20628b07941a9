"""`fp4`: the LLM's decoder-layer linears as bitsandbytes 4-bit float (double quant, bf16 compute).

Same as `nf4` with bitsandbytes' FP4 code book instead of NormalFloat; a preparer.
"""

from __future__ import annotations

from egpt_speed.quantize import BnbPreparer, BnbScheme
from egpt_speed.strategies.registry import Strategy, register


@register
class FP4(BnbPreparer, Strategy):
    name = "fp4"
    summary = "bitsandbytes FP4 4-bit weights for the LLM (double quant, bf16 compute); vision stack unchanged"
    scheme = BnbScheme("fp4")
    kernel = "bitsandbytes 4-bit"
