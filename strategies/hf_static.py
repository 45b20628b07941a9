"""`hf-static`: transformers' own `generate(..., cache_implementation="static")` on the spliced prefix.

On CUDA transformers compiles the model's forward automatically for a static cache (the first
sample pays the compilation: keep warm-up samples); elsewhere it runs the static cache eagerly.
The prefill/decode split is the baseline's first-token hook.
"""

from __future__ import annotations

from egpt_speed.hf_generate import generate_baseline
from egpt_speed.strategies.registry import Strategy, register


@register
class HFStatic(Strategy):
    name = "hf-static"
    summary = "transformers generate with cache_implementation='static' (auto-compiled on CUDA)"

    def decode(self, model, request, clock):
        return generate_baseline(model, request, clock, cache_implementation="static")

    def settings(self) -> dict:
        return {"cache_implementation": "static", "auto_compile": self.ctx.device.type == "cuda"}
