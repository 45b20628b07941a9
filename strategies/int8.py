"""`int8`: the LLM's decoder-layer linears as bitsandbytes LLM.int8 (outlier threshold 6.0).

A preparer. LLM.int8 halves weight memory but its mixed-precision matmul is slow at batch 1
(on an H100 ~4× the bf16 per-token time): measured, not assumed.
"""

from __future__ import annotations

from egpt_speed.quantize import KEPT_IN_RUN_DTYPE, BnbScheme, cuda_reason, package_reason, package_version, quantize_llm_bnb
from strategies.registry import Strategy, register


@register
class Int8(Strategy):
    name = "int8"
    summary = "bitsandbytes LLM.int8 weights for the LLM (outlier threshold 6.0); vision stack unchanged"
    decodes = False
    modifies_model = True
    lossless = False
    scheme = BnbScheme("int8")

    def unavailable_reason(self) -> str | None:
        return cuda_reason(self.ctx.device, "bitsandbytes LLM.int8") or package_reason("bitsandbytes", "bitsandbytes")

    def prepare(self, model) -> None:
        self.converted = quantize_llm_bnb(model.llm, self.scheme, model.device)

    def settings(self) -> dict:
        return {**self.scheme.describe(), "bitsandbytes": package_version("bitsandbytes"),
                "quantized_linears": getattr(self, "converted", None), "kept_in_run_dtype": KEPT_IN_RUN_DTYPE}
