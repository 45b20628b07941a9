"""`pld`: prompt lookup decoding — the draft is a copy of what followed the last n-gram elsewhere.

No draft model: proposers.PromptLookupProposer searches the prompt text and the tokens generated
so far for the most recent earlier occurrence of the current suffix n-gram (longest n first) and
proposes the γ tokens that followed it. Verification is the shared lossless loop.
"""

from __future__ import annotations

from egpt_speed.decoding import eos_ids
from egpt_speed.options import StrategyOptions
from egpt_speed.proposers import PromptLookupProposer
from egpt_speed.speculation import speculative_decode
from egpt_speed.strategies.registry import Strategy, register

DEFAULT_MAX_NGRAM = StrategyOptions.pld_ngram  # used when the run gives no --pld-ngram (the CLI's default)


@register
class PromptLookup(Strategy):
    name = "pld"
    accepts_lent_target = True
    summary = "prompt lookup decoding: n-gram copies from the prompt and output as drafts; greedy lossless"

    @property
    def max_ngram(self) -> int:
        return int(self.ctx.options.get("pld_ngram") or DEFAULT_MAX_NGRAM)

    def decode(self, model, request, clock):
        prefix_embeds = model.splice(request.prompt_ids, request.event_features)
        proposer = PromptLookupProposer(request.text_ids.tolist(), model.llm.get_output_embeddings().weight.shape[0],
                                        model.device, self.max_ngram)
        target = self.verify_target(model, prefix_embeds, request.settings)
        return speculative_decode(target, prefix_embeds, proposer, request.settings, self.ctx.gamma, eos_ids(model), clock)

    def settings(self) -> dict:
        return {"gamma": self.ctx.gamma, "max_ngram": self.max_ngram}
