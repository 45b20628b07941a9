"""`batch`: static batching — `--batch-size` prompts' spliced prefixes, left-padded, in one `generate` call.

The runner collects N encoded samples and calls `decode_batch` once; each prompt's result is split
back out (its new tokens up to and including EOS, no padding). Every sample of a batch shares the
batch's Stage-4 time (its latency) and the runner adds the batch's throughput. Greedy by default;
`--sample` draws from one seeded generator for the whole batch, so sampled tokens differ from
batch-1 runs. Composes with preparers (`sdpa+batch`, `nf4+batch`), not with another decoder.
"""

from __future__ import annotations

from egpt_speed.attention import FORCED_FLASH
from egpt_speed.errors import EgptError
from egpt_speed.hf_generate import generate_batch
from egpt_speed.strategies.registry import Strategy, register


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
                "latency": "each sample's stage4_ms is its batch's",
                "stage3": "a sample whose record has stage3_batch_size was encoded with its batch in one vision-tower "
                          "call (baselines.encode.encode_batch): its stage3_ms is the batch's Stage 3 time / batch size"}
