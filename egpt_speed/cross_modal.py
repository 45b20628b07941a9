"""Cross-modal drafting: a draft of another model family that sees its own modality of the same sample.

An EventGPT draft for a LLaVA / Video-LLaVA target (or the reverse) runs its own Stages 1–3 on the
sample (events vs video frames), splices its own prefix and drafts tokens the target verifies. Its
Stages 1–3 run inside Stage 4, so their time is charged to the strategy (`draft_stage123_ms`).

The two tokenizers must agree on the text vocabulary. `text_vocab_map` finds the shared ids and
maps the rest: added special tokens beyond them (``<image>``, ``<video>``, ``<pad>``, and LM-head
rows no tokenizer names) are never drafted, and a target id the draft lacks is fed to the draft by
its token string, else as the draft's ``<unk>``. Any other disagreement is refused. Drafting only
shared ids keeps the loop lossless: every proposal means the same text to both models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from egpt_speed.datasets import SampleSpec
from egpt_speed.decoding import DecodeRequest
from egpt_speed.errors import EgptError
from egpt_speed.events import OFFICIAL_FRAMES
from egpt_speed.stages import default_preprocess, stage1_load, stage2_preprocess, stage3_vision
from egpt_speed.timing import synchronize

VOCAB_RULE = ("cross-modal drafting maps only added special tokens (such as <image>, <video>) beyond the shared "
              "text vocabulary, so the two tokenizers must agree on every other id.")


@dataclass
class SampleRequest(DecodeRequest):
    """A DecodeRequest that also names the sample's files, for a draft that reads its own modality."""

    spec: SampleSpec | None = None


@dataclass(frozen=True)
class TokenMap:
    """Ids between a target and a draft whose tokenizers share the text ids [0, shared)."""

    shared: int
    target_vocab: int  # rows of the target's LM head
    to_draft: torch.Tensor  # [target_vocab] long: the draft id fed for each target id
    mapped_out: tuple[str, ...]  # added tokens never drafted (recorded in the result)

    def draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """target ids [...] → the draft's ids [...] for the same text."""
        return self.to_draft.to(target_ids.device)[target_ids]

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """draft logits [V_draft] → [V_target]: the shared ids' logits, −inf elsewhere (never drafted)."""
        out = draft_logits.new_full((self.target_vocab,), float("-inf"))
        out[:self.shared] = draft_logits[:self.shared]
        return out


def _special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's added special tokens (<s>, </s>, <image>, <video>, <pad>, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {index for index, token in added.items() if getattr(token, "special", False)}


def _describe(token: str | None) -> str:
    return "no token" if token is None else f"token {token!r}"


def _shared_prefix(target_tokens: list[str], draft_tokens: list[str]) -> int:
    for index, (ours, theirs) in enumerate(zip(target_tokens, draft_tokens)):
        if ours != theirs:
            return index
    return min(len(target_tokens), len(draft_tokens))


def _check_beyond_shared(target_tokenizer, draft_tokenizer, target_tokens: list[str], draft_tokens: list[str],
                         shared: int, draft_name: str) -> None:
    """Every id at or past the shared prefix must be an added special token in whichever tokenizer has it."""
    target_special, draft_special = _special_ids(target_tokenizer), _special_ids(draft_tokenizer)
    for index in range(shared, max(len(target_tokens), len(draft_tokens))):
        ours = target_tokens[index] if index < len(target_tokens) else None
        theirs = draft_tokens[index] if index < len(draft_tokens) else None
        if (ours is None or index in target_special) and (theirs is None or index in draft_special):
            continue
        raise EgptError(f"draft {draft_name} has {_describe(theirs)} at id {index} where the target has "
                        f"{_describe(ours)}; " + VOCAB_RULE)


def _check_special_ids(target_tokenizer, draft_tokenizer, shared: int, draft_name: str) -> None:
    for attribute in ("bos_token_id", "eos_token_id"):
        ours, theirs = getattr(target_tokenizer, attribute), getattr(draft_tokenizer, attribute)
        if ours is None or theirs is None:
            continue
        if ours != theirs:
            raise EgptError(f"draft {draft_name} has {attribute} {theirs} but the target has {ours}; "
                            "a draft must share the target's tokenizer.")
        if ours >= shared:
            raise EgptError(f"{attribute} {ours} lies outside the {shared} text ids draft {draft_name} shares with "
                            "the target; a draft must share the target's tokenizer.")


def text_vocab_map(target_tokenizer, target_vocab: int, draft_tokenizer, draft_vocab: int, draft_name: str) -> TokenMap:
    """The shared text ids of two tokenizers and the mapping of everything else, or a clear EgptError.

    target_vocab / draft_vocab: rows of each LM head (may exceed the tokenizer, e.g. LLaVA pads to 32064).
    """
    target_tokens = target_tokenizer.convert_ids_to_tokens(list(range(min(len(target_tokenizer), target_vocab))))
    draft_tokens = draft_tokenizer.convert_ids_to_tokens(list(range(min(len(draft_tokenizer), draft_vocab))))
    shared = _shared_prefix(target_tokens, draft_tokens)
    _check_beyond_shared(target_tokenizer, draft_tokenizer, target_tokens, draft_tokens, shared, draft_name)
    _check_special_ids(target_tokenizer, draft_tokenizer, shared, draft_name)
    draft_index = {token: index for index, token in enumerate(draft_tokens)}
    fallback = draft_tokenizer.unk_token_id if draft_tokenizer.unk_token_id is not None else 0
    to_draft = torch.full((target_vocab,), fallback, dtype=torch.long)
    to_draft[:shared] = torch.arange(shared)
    for index in range(shared, len(target_tokens)):
        to_draft[index] = draft_index.get(target_tokens[index], fallback)
    mapped_out = tuple(sorted(set(target_tokens[shared:]) | set(draft_tokens[shared:])))
    return TokenMap(shared, target_vocab, to_draft, mapped_out)


# ---- the draft's own Stages 1–3 ----------------------------------------------------------------------

@dataclass
class DraftPrefix:
    """The draft's spliced prompt for one sample and what its own Stages 1–3 cost."""

    embeds: torch.Tensor  # [1, L_draft, H_draft]
    stage_ms: dict[str, float] = field(default_factory=dict)  # draft_stage1_ms .. draft_stage123_ms


def _elapsed_ms(device: torch.device, start: float) -> float:
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def draft_prefix(draft_model, spec: SampleSpec | None, frames: int = OFFICIAL_FRAMES) -> DraftPrefix:
    """Stages 1–3 of `spec` through the draft's own model (its modality, processor and tower), timed.

    Timed with synchronised perf_counter reads, not TimedRegion: that resets the device's peak
    memory counter, which the enclosing Stage-4 region owns.
    """
    if spec is None:
        raise EgptError(f"the cross-modal draft {draft_model.name} reads its own view of each sample, but this "
                        "decode call did not say which sample it is; run it through `egpt-speed run/compare`.")
    device = draft_model.device
    preprocess = default_preprocess(device) if draft_model.family == "eventgpt" else "cpu"
    synchronize(device)
    start = time.perf_counter()
    loaded = stage1_load(spec, "npy", frames, draft_model.family)
    stage1 = _elapsed_ms(device, start)
    start = time.perf_counter()
    pre = stage2_preprocess(loaded, draft_model, frames, preprocess)
    stage2 = _elapsed_ms(device, start)
    start = time.perf_counter()
    encoded = stage3_vision(pre, draft_model)
    stage3 = _elapsed_ms(device, start)
    embeds = draft_model.splice(encoded.prompt_ids, encoded.event_features)
    return DraftPrefix(embeds, {"draft_stage1_ms": stage1, "draft_stage2_ms": stage2, "draft_stage3_ms": stage3,
                                "draft_stage123_ms": stage1 + stage2 + stage3,
                                "draft_prefix_tokens": int(embeds.shape[1])})
