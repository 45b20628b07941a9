"""`fp4`: the LLM's decoder-layer linears as bitsandbytes 4-bit float (double quant, bf16 compute).

Same as `nf4` with bitsandbytes' FP4 code book instead of NormalFloat; a preparer.
"""

from __future__ import annotations

from egpt_speed.quantize import KEPT_IN_RUN_DTYPE, BnbScheme, cuda_reason, package_reason, package_version, quantize_llm_bnb
from strategies.registry import Strategy, register


@register
class FP4(Strategy):
    name = "fp4"
    summary = "bitsandbytes FP4 4-bit weights for the LLM (double quant, bf16 compute); vision stack unchanged"
    decodes = False
    modifies_model = True
    lossless = False
    scheme = BnbScheme("fp4")

    def unavailable_reason(self) -> str | None:
        return cuda_reason(self.ctx.device, "bitsandbytes 4-bit") or package_reason("bitsandbytes", "bitsandbytes")

    def prepare(self, model) -> None:
        self.converted = quantize_llm_bnb(model.llm, self.scheme, model.device)

    def settings(self) -> dict:
        return {**self.scheme.describe(), "bitsandbytes": package_version("bitsandbytes"),
                "quantized_linears": getattr(self, "converted", None), "kept_in_run_dtype": KEPT_IN_RUN_DTYPE}
