"""`batch`: static batching — `--batch-size` prompts' spliced prefixes, left-padded, in one `generate` call.

The runner collects N encoded samples and calls `decode_batch` once; each prompt's result is split
back out (its new tokens up to and including EOS, no padding). Every sample of a batch shares the
batch's Stage-4 time (its latency) and the runner adds the batch's throughput. Greedy by default;
`--sample` draws from one seeded generator for the whole batch, so sampled tokens differ from
batch-1 runs. Composes with preparers (`sdpa+batch`, `nf4+batch`), not with another decoder.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteriaList

from egpt_speed.baselines.decoder import _FirstTokenMark, generation_kwargs
from egpt_speed.attention import FORCED_FLASH
from egpt_speed.decoding import DecodeRequest, DecodeResult, eos_ids, truncate_at_eos
from egpt_speed.errors import EgptError
from egpt_speed.timing import Clock
from egpt_speed.strategies.registry import Strategy, register


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
                                stopping_criteria=StoppingCriteriaList([_FirstTokenMark(clock)]),
                                **generation_kwargs(model, requests[0]))  # [B, T] new tokens, finished rows padded
    stop = eos_ids(model)
    rows = output.tolist()  # once, after generation
    padded_len = embeds.shape[1]
    return [DecodeResult(truncate_at_eos(row, stop, settings.max_new_tokens),
                         metrics={"batch_size": len(requests), "batch_padded_len": padded_len,
                                  "pad_tokens": padded_len - prefix.shape[0]})
            for row, prefix in zip(rows, prefixes)]


@register
class Batch(Strategy):
    name = "batch"
    summary = "static batching: --batch-size prompts left-padded into one generate call; latency = the batch's"

    @property
    def batched(self) -> bool:
        return True

    def prepare(self, model) -> None:
        if self.ctx.batch_size > 1 and model.llm.config._attn_implementation == FORCED_FLASH:
            raise EgptError("sdpa-flash cannot run left-padded batches (PyTorch's FlashAttention kernel takes no "
                            "padding mask); use sdpa+batch or flash-attn+batch.")

    def decode(self, model, request, clock):
        return generate_batch(model, [request], clock)[0]

    def decode_batch(self, model, requests, clock):
        return generate_batch(model, requests, clock)

    def settings(self) -> dict:
        return {"batch_size": self.ctx.batch_size, "padding": "left", "cache": "dynamic",
                "latency": "each sample's stage4_ms is its batch's"}
