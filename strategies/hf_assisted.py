"""`hf-assisted`: transformers' own assisted generation, as an independent cross-check of `speculative`.

transformers cannot put a multimodal `inputs_embeds` prefix on the target while a draft of
another width reads token ids, so this strategy runs the *text-only* path: target and draft both
see the prompt without the event placeholder. Its outputs therefore differ from `baseline`'s (no
events); compare it with `speculative` on the same text-only prompt (tests do, token for token).
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteriaList

from egpt_speed.hf_generate import FirstTokenMark
from egpt_speed.decoding import DecodeResult
from egpt_speed.drafts import load_draft
from egpt_speed.errors import EgptError
from egpt_speed.strategies.registry import Strategy, register


def assisted_generate(target_llm, draft_llm, text_ids: torch.Tensor, max_new_tokens: int, gamma: int,
                      eos_token_id, pad_token_id, stopping_criteria=None) -> list[int]:
    """Greedy assisted generation on token ids; text_ids: [L] → new tokens."""
    input_ids = text_ids.unsqueeze(0).to(target_llm.device)
    output = target_llm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 assistant_model=draft_llm, num_assistant_tokens=gamma,
                                 num_assistant_tokens_schedule="constant", max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, stopping_criteria=stopping_criteria)
    return output[0, input_ids.shape[1]:].tolist()


@register
class HfAssisted(Strategy):
    name = "hf-assisted"
    summary = "transformers assisted generation (assistant_model) on the TEXT-ONLY prompt: a cross-check of the speculative loop"

    def prepare(self, model) -> None:
        self.draft = load_draft(self.ctx.draft_spec, model, self.ctx.model_spec, self.ctx.device, self.ctx.dtype)
        if self.draft.head is not None or self.draft.multimodal:
            raise EgptError("hf-assisted needs a causal-LM draft (e.g. --draft tiny-truncated); "
                            "transformers' assisted generation cannot drive an EAGLE head or the target itself.")

    @torch.inference_mode()
    def decode(self, model, request, clock):
        if request.settings.do_sample:
            raise EgptError("hf-assisted is a greedy cross-check; drop --sample.")
        tokens = assisted_generate(model.llm, self.draft.llm, request.text_ids, request.settings.max_new_tokens,
                                   self.ctx.gamma, model.llm.generation_config.eos_token_id,
                                   model.llm.generation_config.pad_token_id,
                                   StoppingCriteriaList([FirstTokenMark(clock)]))
        return DecodeResult(tokens, {"text_only": True})

    def settings(self) -> dict:
        draft = getattr(self, "draft", None)
        return {"gamma": self.ctx.gamma, "draft": draft.name if draft else self.ctx.draft_spec, "text_only": True}
