"""What Stage 4 hands a strategy and what it gets back, plus the small helpers every decoder shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import inspect

import torch
from transformers.models.llama.modeling_llama import LlamaModel

from egpt_speed.options import MeasureOptions
from egpt_speed.prompt import text_only_ids

# transformers 5.x renamed forward's `past_key_values` to `cache` (5.24 warns on the old name, which
# goes in 5.40); older 5.x releases we support (>= 5.17) may know only the old one. Every model
# class of one install uses the same name.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = MeasureOptions.temperature  # the CLI's --temperature default, defined once
    top_p: float = 1.0
    seed: int = 0


@dataclass
class DecodeRequest:
    """One prompt for Stage 4: the cached Stage-3 features and the tokenised prompt."""

    id: str
    prompt_ids: torch.Tensor  # [L] with one −200 placeholder, on the device
    event_features: torch.Tensor  # [N_ev, H] from Stage 3, on the device
    settings: GenerationSettings

    @property
    def text_ids(self) -> torch.Tensor:
        """[L-1] the prompt without the placeholder (what a text-only draft sees)."""
        return text_only_ids(self.prompt_ids)


@dataclass
class DecodeResult:
    token_ids: list[int]  # new tokens only, EOS included when generated
    metrics: dict[str, Any] = field(default_factory=dict)  # strategy counters (drafted, accepted, ...)


def crop_cache(cache, length: int) -> None:
    """Keep the first `length` positions of a transformers Cache.

    Uses the negative "remove n tokens" form: transformers ≤ 5.17 also took an absolute length,
    5.18+ refuses it; both accept the negative one (and `crop(0)` would empty a layer there).
    """
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def with_cache(cache, **inputs) -> dict:
    """Forward kwargs that feed `cache` (a transformers Cache) under this install's name for it."""
    return {CACHE_KWARG: cache, "use_cache": True, **inputs}


def eos_ids(model) -> set[int]:
    """The ids that end generation, from the LLM's generation config (may be an int or a list)."""
    configured = model.llm.generation_config.eos_token_id
    if configured is None:
        configured = model.tokenizer.eos_token_id
    if configured is None:
        return set()
    return set(configured) if isinstance(configured, (list, tuple)) else {int(configured)}


def truncate_at_eos(tokens: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """Cut after the first EOS (kept, as generate keeps it) and at max_new_tokens."""
    for index, token in enumerate(tokens[:max_new_tokens]):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens[:max_new_tokens]


def make_generator(settings: GenerationSettings, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(settings.seed)


def draft_token(logits: torch.Tensor, settings: GenerationSettings,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A drafter's next token from its logits [V]: (token [1], p_draft [V] when sampling else None)."""
    if not settings.do_sample:
        return logits.argmax().reshape(1), None
    probs = sampling_probs(logits, settings)
    return torch.multinomial(probs, 1, generator=generator), probs


def sampling_probs(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Temperature + top-p probabilities, the distribution a sampled decoder draws from.

    logits: [..., V] → probs [..., V] (float32).
    """
    logits = logits.float() / max(settings.temperature, 1e-5)
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        drop = cumulative - sorted_probs > settings.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@torch.inference_mode()
def teacher_forced_top1(model, request: DecodeRequest, reference: list[int]) -> float | None:
    """Share of reference positions where the model's argmax, fed the reference prefix, is the reference token.

    One forward over [spliced prompt, reference[:-1]]; judges a lossy model (quantised) without
    letting one early divergence decide every later position.
    """
    if not reference:
        return None
    prefix = model.splice(request.prompt_ids, request.event_features)  # [1, L, H]
    tokens = torch.tensor(reference, device=prefix.device)
    inputs = torch.cat([prefix, model.llm.get_input_embeddings()(tokens[:-1]).unsqueeze(0).to(prefix.dtype)], dim=1)
    logits = model.llm(inputs_embeds=inputs, logits_to_keep=len(reference)).logits[0]  # [n, V]
    return float((logits.argmax(-1) == tokens).float().mean())
