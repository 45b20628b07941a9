"""Prompt templates and the −200 event-placeholder tokenisation EventGPT uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EVENT_PLACEHOLDER = "<event>"
EVENT_TOKEN_INDEX = -200
MAX_CONTEXT = 2048

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class PromptTemplate:
    """How a query becomes the prompt text; `<event>` marks where the event features go."""

    name: str  # "eventgpt_v1" (Vicuna v1, the real checkpoint) or "chat_template" (the tokenizer's own)

    def render(self, query: str, tokenizer) -> str:
        if self.name == "eventgpt_v1":
            # conv mode eventgpt_v1: system + " USER: <ev_start><event><ev_end>\n{query} ASSISTANT:"
            return f"{VICUNA_SYSTEM} USER: <ev_start>{EVENT_PLACEHOLDER}<ev_end>\n{query} ASSISTANT:"
        if self.name == "chat_template":
            messages = [{"role": "user", "content": f"{EVENT_PLACEHOLDER}\n{query}"}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        raise ValueError(f"unknown prompt template {self.name!r}")


def tokenize_with_event_placeholder(prompt: str, tokenizer, fold_to_vocab: int | None = None) -> list[int]:
    """Split on `<event>`, tokenize each chunk, keep one leading BOS, insert −200 between chunks.

    This mirrors LLaVA/EventGPT's `tokenizer_event_token`: every chunk is tokenized as the
    tokenizer would on its own (so it may get a BOS); only the first chunk keeps it.
    `fold_to_vocab` maps ids ≥ N into [3, N) — only for random-weight presets whose LLM vocab is
    smaller than the borrowed tokenizer's (ids there just index random embeddings).
    """
    chunks = prompt.split(EVENT_PLACEHOLDER)
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for index, chunk in enumerate(chunks):
        chunk_ids = tokenizer(chunk).input_ids
        if index > 0 and bos is not None and chunk_ids[:1] == [bos] and not chunk.startswith(tokenizer.bos_token or "\0"):
            chunk_ids = chunk_ids[1:]
        if index > 0:
            ids.append(EVENT_TOKEN_INDEX)
        ids.extend(chunk_ids)
    if fold_to_vocab is not None:
        ids = [i if i < fold_to_vocab else 3 + i % (fold_to_vocab - 3) for i in ids]
    return ids


def text_only_ids(prompt_ids: torch.Tensor) -> torch.Tensor:
    """The prompt with the event placeholder removed: what a text-only draft model sees.

    prompt_ids: [L] with one −200 → returns [L-1].
    """
    return prompt_ids[prompt_ids != EVENT_TOKEN_INDEX]
