"""`--model` → a loaded model: a preset name (`tiny`, `synthetic-7b`), an EventGPT checkpoint dir, or a
transformers LLaVA-1.5 / Video-LLaVA checkpoint dir (`llava_family`, the same interface for the stages).

The parts live by job: `eventgpt` (the module), `checkpoint` (reading a checkpoint dir),
`vision_tower`, `tokenizers`, `presets`, `devices`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from egpt_speed.checkpoint import check_checkpoint, load_eventgpt_checkpoint
from egpt_speed.devices import resolve_device, resolve_dtype
from egpt_speed.errors import EgptError
from egpt_speed.eventgpt import EventGPT
from egpt_speed.llava_family import FAMILIES, check_llava_checkpoint, load_llava_checkpoint, read_model_type
from egpt_speed.presets import PRESET_FAMILIES, PRESETS, build_preset, cache_root, synthetic_7b_configs, tiny_llm_dir
from egpt_speed.vision_tower import check_vision_tower_override

# Imported from here by modules outside this change's ownership; new code imports them from their own modules.
__all__ = ["load_model", "check_model_spec", "model_family", "EventGPT", "cache_root", "load_eventgpt_checkpoint", "resolve_device",
           "resolve_dtype", "synthetic_7b_configs", "tiny_llm_dir"]


def load_model(spec: str, dtype: torch.dtype, device: torch.device, vision_tower: Path | None = None,
               allow_tokenizer_mismatch: bool = False) -> EventGPT:
    """A preset name, an EventGPT checkpoint dir or a LLaVA / Video-LLaVA one → the loaded model on the device.

    A checkpoint whose tokenizer encodes the prompt template unlike its `tokenizer.model` is refused
    unless `allow_tokenizer_mismatch`; then the mismatch is in `model.tokenizer_mismatch` (None otherwise).
    """
    if spec in PRESETS:
        check_vision_tower_override(vision_tower)
        return build_preset(spec, dtype, device)
    if model_family(spec) != "eventgpt":
        _refuse_vision_tower(spec, vision_tower)
        return load_llava_checkpoint(Path(spec), dtype, device)
    return load_eventgpt_checkpoint(Path(spec), dtype, device, vision_tower, allow_tokenizer_mismatch)


def model_family(spec: str) -> str:
    """`eventgpt` for an EventGPT preset or dir, `llava` / `video_llava` for those presets and checkpoints (config only)."""
    if spec in PRESETS:
        return PRESET_FAMILIES.get(spec, "eventgpt")
    family = read_model_type(Path(spec))
    return family if family in FAMILIES else "eventgpt"


def check_model_spec(spec: str, vision_tower: Path | None = None) -> None:
    """Cheap validation before anything heavy is loaded (fail fast on bad paths/configs)."""
    if spec in PRESETS:
        check_vision_tower_override(vision_tower)
        return
    if model_family(spec) != "eventgpt":
        _refuse_vision_tower(spec, vision_tower)
        check_llava_checkpoint(Path(spec))
        return
    check_checkpoint(Path(spec), PRESETS, vision_tower)


def _refuse_vision_tower(spec: str, vision_tower: Path | None) -> None:
    if vision_tower is not None:
        raise EgptError(f"--vision-tower replaces an EventGPT checkpoint's CLIP; {spec} is a {model_family(spec)} "
                        "checkpoint with its own vision tower, so drop --vision-tower.")
