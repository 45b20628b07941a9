"""`pld`: prompt lookup decoding — the draft is a copy of what followed the last n-gram elsewhere.

No draft model: the proposer searches the prompt text and the tokens generated so far for the
most recent earlier occurrence of the current suffix n-gram (longest n first) and proposes the
γ tokens that followed it. Verification is the shared lossless loop.
"""

from __future__ import annotations

import torch

from egpt_speed.decoding import eos_ids
from egpt_speed.speculation import lend_target_to, speculative_decode
from egpt_speed.strategies.registry import Strategy, register


class PromptLookupProposer:
    def __init__(self, context_ids: list[int], vocab_size: int, device: torch.device, max_ngram: int = 3):
        self.context = context_ids  # the text prompt (event placeholder removed)
        self.vocab_size = vocab_size
        self.device = device
        self.max_ngram = max_ngram

    def start(self) -> None:
        pass

    def propose(self, committed, gamma, settings, generator):
        history = self.context + committed
        found: list[int] = []
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            suffix = history[-n:]
            # most recent earlier occurrence whose continuation exists
            for start in range(len(history) - n - 1, -1, -1):
                if history[start:start + n] == suffix:
                    found = history[start + n:start + n + gamma]
                    break
            if found:
                break
        tokens = torch.tensor(found, dtype=torch.long, device=self.device)
        if settings.do_sample and found:
            # a deterministic proposal is the one-hot distribution; rejection sampling stays exact
            return tokens, torch.nn.functional.one_hot(tokens, self.vocab_size).float()
        return tokens, None

    def rollback(self, committed) -> None:
        pass


@register
class PromptLookup(Strategy):
    name = "pld"
    accepts_lent_target = True
    summary = "prompt lookup decoding: n-gram copies from the prompt and output as drafts; greedy lossless"

    def decode(self, model, request, clock):
        prefix_embeds = model.splice(request.prompt_ids, request.event_features)
        proposer = PromptLookupProposer(request.text_ids.tolist(), model.llm.get_output_embeddings().weight.shape[0],
                                        model.device, int(self.ctx.options.get("pld_ngram") or 3))
        return speculative_decode(model.llm, prefix_embeds, proposer, request.settings, self.ctx.gamma,
                                  eos_ids(model), clock, target=lend_target_to(self, prefix_embeds, request.settings, model))

    def settings(self) -> dict:
        return {"gamma": self.ctx.gamma, "max_ngram": int(self.ctx.options.get("pld_ngram") or 3)}
