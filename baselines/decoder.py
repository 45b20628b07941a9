"""The reference Stage-4 decoder: transformers `generate` on the spliced `inputs_embeds`.

Greedy (or seeded sampling), dynamic KV cache, no compilation — what an EventGPT user runs today.
Prefill/decode are separated by a stopping-criteria hook that marks the first new token.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from egpt_speed.decoding import DecodeRequest, DecodeResult
from egpt_speed.timing import Clock


class _FirstTokenMark(StoppingCriteria):
    """Called by generate after every step; the first call is right after the prefill token."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.clock.mark_first_token()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generation_kwargs(model, request: DecodeRequest) -> dict:
    settings = request.settings
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                  pad_token_id=model.llm.generation_config.pad_token_id, use_cache=True)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
def generate_baseline(model, request: DecodeRequest, clock: Clock, **extra) -> DecodeResult:
    """One prompt through `model.llm.generate(inputs_embeds=...)`; returns the new tokens only."""
    if request.settings.do_sample:
        torch.manual_seed(request.settings.seed)
    embeds = model.splice(request.prompt_ids, request.event_features)  # [1, L', H]
    attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    output = model.llm.generate(inputs_embeds=embeds, attention_mask=attention,
                                stopping_criteria=StoppingCriteriaList([_FirstTokenMark(clock)]),
                                **generation_kwargs(model, request), **extra)
    return DecodeResult(token_ids=output[0].tolist())
