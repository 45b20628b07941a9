"""transformers `generate` on spliced `inputs_embeds`: the reference decoder and its batched form.

Greedy (or seeded sampling), dynamic KV cache, no compilation — what an EventGPT user runs today.
Prefill/decode are separated by a stopping-criteria hook that marks the first new token.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from egpt_speed.decoding import DecodeRequest, DecodeResult, eos_ids, truncate_at_eos
from egpt_speed.errors import EgptError
from egpt_speed.timing import Clock


class FirstTokenMark(StoppingCriteria):
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
                                stopping_criteria=StoppingCriteriaList([FirstTokenMark(clock)]),
                                **generation_kwargs(model, request), **extra)
    return DecodeResult(token_ids=output[0].tolist())


def left_pad(prefixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prefixes of different lengths, padding on the left (decoder-only generation appends on the right).

    prefixes: B tensors [L_i, H] → (inputs_embeds [B, L_max, H] with zero rows as padding,
    attention_mask [B, L_max] int64, 0 on padding). generate derives position ids from the mask,
    so each prompt sees positions 0..L_i-1 exactly as when it runs alone.
    """
    length = max(p.shape[0] for p in prefixes)
    first = prefixes[0]
    embeds = first.new_zeros((len(prefixes), length, first.shape[-1]))
    attention = torch.zeros((len(prefixes), length), dtype=torch.long, device=first.device)
    for row, prefix in enumerate(prefixes):
        embeds[row, length - prefix.shape[0]:] = prefix
        attention[row, length - prefix.shape[0]:] = 1
    return embeds, attention


@torch.inference_mode()
def generate_batch(model, requests: list[DecodeRequest], clock: Clock) -> list[DecodeResult]:
    """One `model.llm.generate` over the left-padded batch; per-prompt new tokens, EOS kept, padding dropped."""
    settings = requests[0].settings
    if any(r.settings != settings for r in requests):
        raise EgptError("a batch must share one set of generation settings.")
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    prefixes = [model.splice(r.prompt_ids, r.event_features)[0] for r in requests]  # B × [L_i, H]
    embeds, attention = left_pad(prefixes)  # [B, L_max, H], [B, L_max]
    output = model.llm.generate(inputs_embeds=embeds, attention_mask=attention,
                                stopping_criteria=StoppingCriteriaList([FirstTokenMark(clock)]),
                                **generation_kwargs(model, requests[0]))  # [B, T] new tokens, finished rows padded
    stop = eos_ids(model)
    rows = output.tolist()  # once, after generation
    padded_len = embeds.shape[1]
    return [DecodeResult(truncate_at_eos(row, stop, settings.max_new_tokens),
                         metrics={"batch_size": len(requests), "batch_padded_len": padded_len,
                                  "pad_tokens": padded_len - prefix.shape[0]})
            for row, prefix in zip(rows, prefixes)]
