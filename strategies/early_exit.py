"""`early-exit`: self-speculative decoding — the target's first k layers + final norm + head draft.

The draft shares every weight with the target (no extra memory) and sees the same multimodal
prefix; it keeps its own KV cache for its k layers. `--exit-layer k` (default: a quarter of the
layers).
"""

from __future__ import annotations

from egpt_speed.decoding import eos_ids
from egpt_speed.drafts import layer_truncated_view
from egpt_speed.proposers import CausalLMProposer
from egpt_speed.speculation import speculative_decode
from egpt_speed.strategies.registry import Strategy, register


@register
class EarlyExit(Strategy):
    name = "early-exit"
    accepts_lent_target = True
    summary = "self-speculative: the target's first --exit-layer layers draft, the full target verifies; greedy lossless"

    def prepare(self, model) -> None:
        layers = model.llm.config.num_hidden_layers
        self.exit_layer = int(self.ctx.options.get("exit_layer") or max(1, layers // 4))
        self.view = layer_truncated_view(model.llm, self.exit_layer)

    def decode(self, model, request, clock):
        prefix_embeds = model.splice(request.prompt_ids, request.event_features)
        proposer = CausalLMProposer(self.view, prefix_embeds=prefix_embeds)
        target = self.verify_target(model, prefix_embeds, request.settings)
        return speculative_decode(target, prefix_embeds, proposer, request.settings, self.ctx.gamma, eos_ids(model), clock)

    def settings(self) -> dict:
        return {"gamma": self.ctx.gamma, "exit_layer": getattr(self, "exit_layer", self.ctx.options.get("exit_layer"))}
