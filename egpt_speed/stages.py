"""The four stages of one EventGPT sample, each a plain function with typed input and output.

1 load (disk → events or PNG frames), 2 preprocess (render, CLIP processor, tokenize, to device),
3 vision (CLIP → projector → adaptor → pooling, cached), 4 decode (a strategy, from the cache).
The runner times each call; nothing here reads a clock. A LLaVA-1.5 / Video-LLaVA model
(`llava_family`, `model.family` != "eventgpt") goes through the same stages: Stage 1 reads the clip's
video frames, Stage 2 is the checkpoint's own processor, Stage 3 its tower + projector.
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
from egpt_speed.llava_family import load_clip_frames
from egpt_speed.preprocess import (Preprocess, check_preprocess, clip_spec, events_pixel_values, frames_pixel_values,
                                   max_pixel_diff)
from egpt_speed.prompt import MAX_CONTEXT, tokenize_with_event_placeholder
from egpt_speed.timing import Clock
from egpt_speed.vision_graph import encode_frames_fast

Source = Literal["npy", "png"]


@dataclass
class LoadedSample:
    """Stage 1 output: the raw clip (npy source) or its pre-rendered frames (png source)."""

    spec: SampleSpec
    events: EventStream | None
    frames: list[np.ndarray] | None  # [H, W, 3] uint8 each: png source, or a LLaVA family's video frames

    @property
    def warnings(self) -> tuple[str, ...]:
        """Input oddities that did not stop the sample (unsorted/negative timestamps), for the result."""
        return self.events.warnings if self.events is not None else ()


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
    event_features: torch.Tensor  # [T + P, H] (582 for 5 frames, 578 for 1); a LLaVA family's visual tokens
    prompt_ids: torch.Tensor  # [L]
    max_context: int = MAX_CONTEXT  # the model's context length, checked by make_request


def stage1_load(spec: SampleSpec, source: Source, frames: int, family: str = "eventgpt") -> LoadedSample:
    """The clip from disk: events (npy) or pre-rendered PNGs for EventGPT; video frames for a LLaVA family."""
    if family != "eventgpt":
        return LoadedSample(spec, None, load_clip_frames(spec, family))
    if source == "npy":
        if spec.event_path is None:
            raise EgptError(f"sample {spec.id} has no event npy; use --source png.")
        return LoadedSample(spec, load_event_npy(spec.event_path), None)
    paths = spec.image_paths if frames == 5 else spec.image_1f_paths
    if len(paths) != frames:
        raise EgptError(f"sample {spec.id} has {len(paths)} pre-rendered PNGs for --frames {frames}; use --source npy.")
    return LoadedSample(spec, None, load_png_frames(paths))


def default_preprocess(device: torch.device) -> Preprocess:
    """Where Stage 2's image work runs unless the user says: on the GPU when there is one."""
    return "device" if device.type == "cuda" else "cpu"


def stage2_preprocess(loaded: LoadedSample, model, frames: int, preprocess: Preprocess = "cpu") -> PreprocessedSample:
    """Render + CLIP processor (+ device copy) and tokenisation.

    preprocess "cpu": numpy renderer + the model's transformers processor, then a copy to the device;
    "device": the same pixels as tensor ops on the model's device (bit-exact to the PIL processor).
    """
    check_preprocess(preprocess)
    if model.family != "eventgpt":
        if preprocess == "device":
            raise EgptError(f"--preprocess device renders EventGPT's event frames; {model.family} uses its own "
                            "processor, so pass --preprocess cpu.")
        pixel_values, prompt_ids = model.preprocess(loaded.frames, loaded.spec.query)
        return PreprocessedSample(loaded.spec, pixel_values, prompt_ids)
    make = device_pixel_values if preprocess == "device" else cpu_pixel_values
    return PreprocessedSample(loaded.spec, make(loaded, model, frames), prompt_ids_for(model, loaded.spec.query))


def cpu_pixel_values(loaded: LoadedSample, model, frames: int) -> torch.Tensor:
    """[T, 3, S, S] in the model's dtype on its device, via the CPU renderer and processor."""
    images = loaded.frames if loaded.frames is not None else render_frames(loaded.events, frames)
    pixel_values = model.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values.to(device=model.device, dtype=model.llm.dtype, non_blocking=True)


def device_pixel_values(loaded: LoadedSample, model, frames: int) -> torch.Tensor:
    """[T, 3, S, S] in the model's dtype, rendered and processed on the model's device."""
    spec = clip_spec(model.image_processor)
    if loaded.frames is not None:
        return frames_pixel_values(loaded.frames, spec, model.device, model.llm.dtype)
    return events_pixel_values(loaded.events, frames, spec, model.device, model.llm.dtype)


def preprocess_pixel_diff(loaded: LoadedSample, model, frames: int) -> float:
    """Largest |device − cpu| pixel value (CLIP-normalised units, before the dtype cast) on this sample.

    For the result's `preprocess_max_pixel_diff`; untimed, call it outside the Stage-2 region.
    """
    spec = clip_spec(model.image_processor)
    cpu_model = _AsFloat32(model)
    reference = cpu_pixel_values(loaded, cpu_model, frames)
    if loaded.frames is not None:
        got = frames_pixel_values(loaded.frames, spec, model.device, torch.float32)
    else:
        got = events_pixel_values(loaded.events, frames, spec, model.device, torch.float32)
    return max_pixel_diff(got, reference)


class _AsFloat32:
    """The model's processor and device with a float32 target dtype, so the diff is not hidden by bf16 rounding."""

    def __init__(self, model):
        self.image_processor, self.device = model.image_processor, model.device
        self.llm = torch.empty(0, dtype=torch.float32)


def prompt_ids_for(model, question: str) -> torch.Tensor:
    """Stage 2's text half: the templated question, tokenised with its −200 event placeholder → [L] on the device."""
    if model.family != "eventgpt":
        return model.prompt_ids(question)
    ids = tokenize_with_event_placeholder(model.template.render(question, model.tokenizer), model.tokenizer,
                                          model.fold_to_vocab)
    return torch.tensor(ids, dtype=torch.long).to(model.device, non_blocking=True)


@torch.inference_mode()
def stage3_vision(pre: PreprocessedSample, model) -> EncodedSample:
    """CLIP → projector → adaptor per frame (through the model's frame encoder, see vision_graph), then pooling."""
    frame_features = encode_frames_fast(model, pre.pixel_values)  # [T, P, H]
    return EncodedSample(pre.spec, model.pool(frame_features), pre.prompt_ids, model.max_context)


@torch.inference_mode()
def stage3_vision_batch(pres: list[PreprocessedSample], model) -> list[EncodedSample]:
    """Stage 3 for several samples in one vision-tower call (all their frames batched), for batched strategies."""
    counts = [int(pre.pixel_values.shape[0]) for pre in pres]
    features = encode_frames_fast(model, torch.cat([pre.pixel_values for pre in pres]))  # [sum T, P, H]
    return [EncodedSample(pre.spec, model.pool(f), pre.prompt_ids, model.max_context)
            for pre, f in zip(pres, features.split(counts))]


def stage4_decode(encoded: EncodedSample, model, strategy, settings: GenerationSettings, clock: Clock) -> DecodeResult:
    request = make_request(encoded, settings)
    return strategy.decode(model, request, clock)


def make_request(encoded: EncodedSample, settings: GenerationSettings) -> DecodeRequest:
    prefix_len = encoded.prompt_ids.numel() - 1 + encoded.event_features.shape[0]
    if prefix_len + settings.max_new_tokens > encoded.max_context:
        raise EgptError(f"sample {encoded.spec.id}: prefix {prefix_len} + --max-new-tokens {settings.max_new_tokens} "
                        f"exceeds the model's {encoded.max_context}-token context; lower --max-new-tokens.")
    return DecodeRequest(encoded.spec.id, encoded.prompt_ids, encoded.event_features, settings)
