"""`fused`: one GEMM for each decoder layer's q/k/v and one for its gate/up projections (egpt_speed.fuse).

A preparer: compose it with a decoder, e.g. `fused+compile` (fewer, larger GEMVs per captured decode
step) or `fused+compile+eagle-tree`. The stacked weights compute the same products, so outputs are
unchanged up to the GEMM kernel's summation order (float32 equal on the CPU, tested).
"""

from __future__ import annotations

from dataclasses import asdict

from egpt_speed.fuse import FUSED_GROUPS, fuse_projections
from egpt_speed.strategies.registry import Strategy, register


@register
class FusedProjections(Strategy):
    name = "fused"
    summary = "LLM q/k/v and gate/up projections fused into one GEMM each (same weights); compose with compile"
    decodes = False
    sets = "the LLM's projection layout"
    modifies_model = True  # the fused modules replace the model's own: compare gives it its own copy

    def prepare(self, model) -> None:
        self.report = fuse_projections(model.llm)

    def settings(self) -> dict:
        report = getattr(self, "report", None)
        return {"fused_groups": {k: list(v) for k, v in FUSED_GROUPS.items()},
                **({"fused": asdict(report)} if report else {})}
