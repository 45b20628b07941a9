"""The four stages of one EventGPT sample, each a plain function with typed input and output.

1 load (disk → events or PNG frames), 2 preprocess (render, CLIP processor, tokenize, to device),
3 vision (CLIP → projector → adaptor → pooling, cached), 4 decode (a strategy, from the cache).
The runner times each call; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from egpt_speed.datasets import SampleSpec
from egpt_speed.decoding import DecodeRequest, DecodeResult, GenerationSettings
from egpt_speed.errors import EgptError
from egpt_speed.events import EventStream, load_event_npy, load_png_frames, render_frames
from egpt_speed.prompt import MAX_CONTEXT, tokenize_with_event_placeholder
from egpt_speed.timing import Clock

Source = Literal["npy", "png"]


@dataclass
class LoadedSample:
    """Stage 1 output: the raw clip (npy source) or its pre-rendered frames (png source)."""

    spec: SampleSpec
    events: EventStream | None
    frames: list[np.ndarray] | None  # [H, W, 3] uint8 each, png source only


@dataclass
class PreprocessedSample:
    """Stage 2 output, already on the device."""

    spec: SampleSpec
    pixel_values: torch.Tensor  # [T, 3, S, S] in the model's dtype
    prompt_ids: torch.Tensor  # [L] int64 with one −200


@dataclass
class EncodedSample:
    """Stage 3 output: the cached event features Stage 4 consumes (it never re-encodes)."""

    spec: SampleSpec
    event_features: torch.Tensor  # [T + P, H] (582 for 5 frames, 578 for 1)
    prompt_ids: torch.Tensor  # [L]


def stage1_load(spec: SampleSpec, source: Source, frames: int) -> LoadedSample:
    if source == "npy":
        if spec.event_path is None:
            raise EgptError(f"sample {spec.id} has no event npy; use --source png.")
        return LoadedSample(spec, load_event_npy(spec.event_path), None)
    paths = spec.image_paths if frames == 5 else spec.image_1f_paths
    if len(paths) != frames:
        raise EgptError(f"sample {spec.id} has {len(paths)} pre-rendered PNGs for --frames {frames}; use --source npy.")
    return LoadedSample(spec, None, load_png_frames(paths))


def stage2_preprocess(loaded: LoadedSample, model, frames: int) -> PreprocessedSample:
    images = loaded.frames if loaded.frames is not None else render_frames(loaded.events, frames)
    pixel_values = model.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(device=model.device, dtype=model.llm.dtype, non_blocking=True)
    return PreprocessedSample(loaded.spec, pixel_values, prompt_ids_for(model, loaded.spec.query))


def prompt_ids_for(model, question: str) -> torch.Tensor:
    """Stage 2's text half: the templated question, tokenised with its −200 event placeholder → [L] on the device."""
    ids = tokenize_with_event_placeholder(model.template.render(question, model.tokenizer), model.tokenizer,
                                          model.fold_to_vocab)
    return torch.tensor(ids, dtype=torch.long).to(model.device, non_blocking=True)


@torch.inference_mode()
def stage3_vision(pre: PreprocessedSample, model) -> EncodedSample:
    frame_features = model.encode_frames(pre.pixel_values)  # [T, P, H]
    return EncodedSample(pre.spec, model.pool(frame_features), pre.prompt_ids)


def stage4_decode(encoded: EncodedSample, model, strategy, settings: GenerationSettings, clock: Clock) -> DecodeResult:
    request = make_request(encoded, settings)
    return strategy.decode(model, request, clock)


def make_request(encoded: EncodedSample, settings: GenerationSettings) -> DecodeRequest:
    prefix_len = encoded.prompt_ids.numel() - 1 + encoded.event_features.shape[0]
    if prefix_len + settings.max_new_tokens > MAX_CONTEXT:
        raise EgptError(f"sample {encoded.spec.id}: prefix {prefix_len} + --max-new-tokens {settings.max_new_tokens} exceeds EventGPT's {MAX_CONTEXT}-token context; lower --max-new-tokens.")
    return DecodeRequest(encoded.spec.id, encoded.prompt_ids, encoded.event_features, settings)
