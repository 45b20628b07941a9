"""A checkpoint's tokenizer: loading it (also from a bare sentencepiece `tokenizer.model`) and the guard
that it encodes the prompt template exactly as that sentencepiece model does.

transformers 5 ignores a sentencepiece model's normaliser (`nmt_nfkc` turns "\\n" into "▁"), so a
checkpoint whose model normalises gets different prompt ids than the original (slow-tokenizer) code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from egpt_speed.datasets import DEFAULT_QUERY
from egpt_speed.errors import EgptError
from egpt_speed.prompt import EVENT_PLACEHOLDER, EVENT_TOKEN_INDEX, PromptTemplate, tokenize_with_event_placeholder

SHOWN_IDS = 6  # ids shown on each side from the first difference


@dataclass(frozen=True)
class TokenizerMismatch:
    """The tokenizer in use and the checkpoint's sentencepiece model encode the rendered template differently."""

    position: int  # first index where the id lists differ
    tokenizer_ids: list[int]  # the tokenizer's ids from `position` on (at most SHOWN_IDS)
    sentencepiece_ids: list[int]  # sentencepiece's ids from `position` on (at most SHOWN_IDS)
    query: str

    def describe(self) -> str:
        return (f"at position {self.position} the tokenizer gives ids {self.tokenizer_ids}, "
                f"sentencepiece gives {self.sentencepiece_ids}")


def needs_sentencepiece_reader(checkpoint: Path) -> bool:
    """True when only tokenizer.model is there and transformers could not convert it (that needs protobuf)."""
    from transformers.utils import is_protobuf_available

    return ((checkpoint / "tokenizer.model").exists() and not (checkpoint / "tokenizer.json").exists()
            and not is_protobuf_available())


def _tokenizer_settings(checkpoint: Path) -> dict:
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (checkpoint / name).exists():
            settings.update(json.loads((checkpoint / name).read_text()))
    return settings


def sentencepiece_llama_tokenizer(checkpoint: Path):
    """The Llama tokenizer of a dir holding only `tokenizer.model` (EventGPT/Vicuna ship no tokenizer.json).

    transformers 5 converts the sentencepiece model through protobuf; without it, this reads the
    pieces with sentencepiece and builds the same tokenizer (vocab by id, merges from the vocab).
    """
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    settings = _tokenizer_settings(checkpoint)

    def content(value):
        return value.get("content") if isinstance(value, dict) else value

    defaults = {"unk_token": processor.unk_id(), "bos_token": processor.bos_id(), "eos_token": processor.eos_id()}
    kwargs = {k: processor.id_to_piece(i) for k, i in defaults.items() if i >= 0}
    kwargs.update({k: content(settings[k]) for k in ("unk_token", "bos_token", "eos_token", "pad_token") if settings.get(k)})
    kwargs.update({k: settings[k] for k in ("legacy", "add_bos_token", "add_eos_token", "model_max_length", "padding_side",
                                            "clean_up_tokenization_spaces") if k in settings})
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), **kwargs)


def load_checkpoint_tokenizer(checkpoint: Path, llm_config):
    """The tokenizer files of a checkpoint dir; `llm_config` spares transformers re-reading the EventGPT config.json."""
    from transformers import AutoTokenizer

    try:
        if needs_sentencepiece_reader(checkpoint):
            return sentencepiece_llama_tokenizer(checkpoint)
        return AutoTokenizer.from_pretrained(str(checkpoint), config=llm_config, trust_remote_code=False)
    except Exception as error:  # missing/broken tokenizer files raise assorted errors
        raise EgptError(f"could not load the tokenizer from {checkpoint} ({type(error).__name__}); "
                        "the dir needs tokenizer.model or tokenizer.json.") from None


def sentencepiece_prompt_ids(model_file: Path, prompt: str, bos_id: int) -> list[int]:
    """The original code's ids: one BOS, each `<event>`-separated chunk encoded by sentencepiece, −200 between."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    ids = [bos_id]
    for index, chunk in enumerate(prompt.split(EVENT_PLACEHOLDER)):
        if index > 0:
            ids.append(EVENT_TOKEN_INDEX)
        ids.extend(processor.encode(chunk))
    return ids


def compare_with_sentencepiece(tokenizer, model_file: Path, template: PromptTemplate,
                               query: str = DEFAULT_QUERY) -> TokenizerMismatch | None:
    """None when `tokenizer` encodes the rendered template exactly as the sentencepiece model does."""
    prompt = template.render(query, tokenizer)
    ours = tokenize_with_event_placeholder(prompt, tokenizer)
    reference = sentencepiece_prompt_ids(model_file, prompt, tokenizer.bos_token_id)
    if ours == reference:
        return None
    position = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    return TokenizerMismatch(position, ours[position:position + SHOWN_IDS], reference[position:position + SHOWN_IDS], query)


def guard_tokenizer(tokenizer, checkpoint: Path, template: PromptTemplate, allow_mismatch: bool) -> TokenizerMismatch | None:
    """Check a checkpoint's tokenizer against its `tokenizer.model`; a mismatch is an error unless allowed."""
    model_file = checkpoint / "tokenizer.model"
    if not model_file.exists():
        return None
    mismatch = compare_with_sentencepiece(tokenizer, model_file, template)
    if mismatch is not None and not allow_mismatch:
        raise EgptError(f"the tokenizer of {checkpoint} encodes the prompt template differently from its tokenizer.model "
                        f"({mismatch.describe()}), so prompts and answers would differ from the original EventGPT code; "
                        "pass --allow-tokenizer-mismatch to run anyway and record the mismatch in the result.")
    return mismatch
