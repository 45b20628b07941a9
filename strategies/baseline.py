"""`baseline`: transformers generate, greedy, dynamic cache — the reference every speedup divides."""

from __future__ import annotations

from egpt_speed.hf_generate import generate_baseline
from egpt_speed.strategies.registry import Strategy, register


@register
class Baseline(Strategy):
    name = "baseline"
    summary = "transformers generate on the spliced prefix, dynamic KV cache, not compiled"

    def decode(self, model, request, clock):
        return generate_baseline(model, request, clock)
