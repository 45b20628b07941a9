"""LLaVA-1.5 and Video-LLaVA presets, built in-process (no checkpoint, no download).

`synthetic-llava-7b` / `synthetic-video-llava-7b`: the released models' shapes with random weights,
built directly on the device, for cost only (like `synthetic-7b`). LLaVA-1.5-7B: CLIP ViT-L/14-336
(576 image tokens, the penultimate layer, CLS dropped) + Vicuna-7B (vocab 32064). Video-LLaVA-7B:
LanguageBind's towers as transformers builds them, CLIP ViT-L/14 at 224 px per frame (257 tokens,
CLS kept) × 8 frames = 2,056 visual tokens + Vicuna-7B. Prompts use the tokenizer `synthetic-7b`
borrows (SmolLM2's), its ids folded into the vocabulary.

`tiny-llava` / `tiny-video-llava`: SmolLM2-135M-Instruct (the `tiny` preset's real weights) behind a
small seeded random tower at the real token geometry, so an EventGPT `tiny` draft and these targets
share a language model and a tokenizer: cross-modal drafting runs on a laptop (`--model
tiny-video-llava --draft tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from egpt_speed.llava_family import FRAMES, LlavaFamilyModel, ProcessorParts, clip_image_processor_class
from egpt_speed.vision_tower import KNOWN_CLIP_TOWERS

VICUNA_VOCAB = 32000  # text ids; LLaVA-1.5 / Video-LLaVA pad the embedding to 32064 rows
PADDED_VOCAB = 32064
PLACEHOLDERS = ["<image>", "<video>"]
# Visual-token RMS relative to the token embeddings after calibration: at 1.0 SmolLM2 answers Video-LLaVA's
# 2,056 random visual tokens with a run of newlines, at 0.2 with sentences (one clip tried, like `tiny`'s choice)
TINY_RMS_RATIO = {"llava": 1.0, "video_llava": 0.2}
TINY_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=14)


@dataclass(frozen=True)
class LlavaPreset:
    family: str  # llava | video_llava
    tower: str  # a KNOWN_CLIP_TOWERS name: its image size and patch give the token geometry
    real_llm: bool  # SmolLM2-135M real weights (tiny-*) or a random Vicuna-7B


LLAVA_PRESETS = {
    "synthetic-llava-7b": LlavaPreset("llava", "clip-vit-large-patch14-336", real_llm=False),
    "synthetic-video-llava-7b": LlavaPreset("video_llava", "clip-vit-large-patch14", real_llm=False),
    "tiny-llava": LlavaPreset("llava", "clip-vit-large-patch14-336", real_llm=True),
    "tiny-video-llava": LlavaPreset("video_llava", "clip-vit-large-patch14", real_llm=True),
}


def vicuna_7b_text_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=PADDED_VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def preset_tokenizer():
    """SmolLM2's tokenizer (what `synthetic-7b` borrows) with the two placeholders added."""
    from transformers import AutoTokenizer

    from egpt_speed.presets import tiny_llm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llm_dir()))
    tokenizer.add_special_tokens({"additional_special_tokens": PLACEHOLDERS})
    return tokenizer


def multimodal_config(preset: LlavaPreset, text_config, tokenizer):
    """The LlavaConfig / VideoLlavaConfig of a preset (placeholder ids: the tokenizer's own)."""
    from transformers import CLIPVisionConfig, LlavaConfig, VideoLlavaConfig

    tower = dict(KNOWN_CLIP_TOWERS[preset.tower])
    if preset.real_llm:
        tower.update(TINY_VISION)
    vision = CLIPVisionConfig(**tower)
    image_id, video_id = tokenizer.convert_tokens_to_ids(PLACEHOLDERS)
    if preset.family == "llava":
        return LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=image_id,
                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    return VideoLlavaConfig(vision_config=vision, text_config=text_config, image_token_id=image_id,
                            video_token_id=video_id, vision_feature_layer=-2)


def processor_parts(preset: LlavaPreset, tokenizer, image_size: int) -> ProcessorParts:
    """The model cards' prompt (no chat template), CLIP preprocessing at the tower's size.

    Both families go through the image processor per frame and the tokenizer: Video-LLaVA's video
    processor needs torchvision, which a device image may lack.
    """
    from transformers import VideoLlavaImageProcessor

    crop = {"height": image_size, "width": image_size}
    cls = clip_image_processor_class() if preset.family == "llava" else VideoLlavaImageProcessor
    return ProcessorParts(None, tokenizer, cls(size={"shortest_edge": image_size}, crop_size=crop), None)


def _model_class(family: str) -> type:
    from transformers import LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

    return LlavaForConditionalGeneration if family == "llava" else VideoLlavaForConditionalGeneration


def build_llava_preset(name: str, dtype: torch.dtype, device: torch.device) -> LlavaFamilyModel:
    preset = LLAVA_PRESETS[name]
    tokenizer = preset_tokenizer()
    if preset.real_llm:
        return _build_tiny(name, preset, tokenizer, dtype, device)
    return _build_synthetic(name, preset, tokenizer, dtype, device)


def _build_synthetic(name: str, preset: LlavaPreset, tokenizer, dtype: torch.dtype,
                     device: torch.device) -> LlavaFamilyModel:
    """Random weights directly on the device (no host copy of 14 GB); cost only, like synthetic-7b."""
    from egpt_speed.presets import default_dtype

    config = multimodal_config(preset, vicuna_7b_text_config(), tokenizer)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        multimodal = _model_class(preset.family)(config)
    parts = processor_parts(preset, tokenizer, config.vision_config.image_size)
    model = LlavaFamilyModel(multimodal.eval(), parts, preset.family, name, random_weights=True,
                             fold_to_vocab=VICUNA_VOCAB)
    model.llm.generation_config.pad_token_id = 0
    return model.eval()


def _build_tiny(name: str, preset: LlavaPreset, tokenizer, dtype: torch.dtype, device: torch.device) -> LlavaFamilyModel:
    """SmolLM2-135M-Instruct's real decoder and LM head behind a seeded random small tower."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from egpt_speed.presets import tiny_llm_dir

    llm = LlamaForCausalLM.from_pretrained(str(tiny_llm_dir()), dtype=torch.float32)
    config = multimodal_config(preset, llm.config, tokenizer)
    torch.manual_seed(0)
    multimodal = _model_class(preset.family)(config)
    multimodal.model.language_model.load_state_dict(llm.model.state_dict())
    multimodal.lm_head.load_state_dict(llm.lm_head.state_dict())
    multimodal.generation_config = GenerationConfig.from_dict(llm.generation_config.to_dict())
    parts = processor_parts(preset, tokenizer, config.vision_config.image_size)
    model = LlavaFamilyModel(multimodal.eval(), parts, preset.family, name)
    calibrate_projector(model)
    return model.to(device=device, dtype=dtype).eval()


def calibration_frames(count: int) -> list[np.ndarray]:
    """A synthetic clip's video frames (the intensity view), evenly spaced: what Stage 1 would read."""
    from egpt_speed.events import SyntheticClipConfig, synthesize_clip
    from egpt_speed.llava_family import evenly_spaced
    from egpt_speed.video_frames import intensity_frames

    config = SyntheticClipConfig(num_events=100_000)
    frames = intensity_frames(synthesize_clip(config, seed=12345), config.width, config.height)
    return [frames[i] for i in evenly_spaced(len(frames), count)]


@torch.no_grad()
def calibrate_projector(model: LlavaFamilyModel) -> None:
    """Centre the random projector's output and scale it to the token embeddings' RMS on a reference clip,
    as the `tiny` preset does for EventGPT's adaptor: raw random features swamp the real text."""
    pixel_values, _ = model.preprocess(calibration_frames(FRAMES[model.family]), "calibration")
    features = model.encode_frames(pixel_values)  # [T, P, H]
    mean = features.mean(dim=(0, 1))
    embed_rms = model.llm.get_input_embeddings().weight.pow(2).mean().sqrt()
    scale = TINY_RMS_RATIO[model.family] * embed_rms / (features - mean).pow(2).mean().sqrt()
    last: nn.Linear = model.projector.linear_2
    last.weight.mul_(scale)
    last.bias.copy_((last.bias - mean) * scale)

