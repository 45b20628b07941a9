"""Reading a released EventGPT checkpoint directory (`model_type: EventChat_llama`) with transformers only.

Layout: a Llama config plus EventGPT keys; plain Llama weights, `model.visual_projector.*`,
`model.feature_adaptor.*` and optionally the CLIP tower under `model.visual_tower.visual_tower.*`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from egpt_speed.errors import EgptError
from egpt_speed.eventgpt import EventGPT
from egpt_speed.prompt import PromptTemplate
from egpt_speed.tokenizers import guard_tokenizer, load_checkpoint_tokenizer
from egpt_speed.vision_tower import (check_vision_tower_override, embedded_tower_config,
                                     find_vision_tower, locate_vision_tower, make_image_processor)

EVENTGPT_EXTRA_KEYS = ("mm_visual_tower", "event_feature_adaptor", "mm_use_im_start_end", "mm_use_im_patch_token")
NOT_LLAMA_KEYS = EVENTGPT_EXTRA_KEYS + ("model_type", "architectures", "auto_map")
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
TOWER_PREFIX = "model.visual_tower.visual_tower."
PROJECTOR_PREFIX = "model.visual_projector."
ADAPTOR_PREFIX = "model.feature_adaptor."
TEMPLATE = PromptTemplate("eventgpt_v1")


def weight_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:  # not JSON/UTF-8, wrong shape
            raise EgptError(f"{index} is not a valid safetensors index ({type(error).__name__}); re-download the checkpoint.") from None
        if not all(isinstance(name, str) and Path(name).name == name for name in names):
            raise EgptError(f"{index} names weight files outside {checkpoint}; re-download the checkpoint.")
        return _regular_files([checkpoint / n for n in names])
    files = sorted(checkpoint.glob("*.safetensors")) or sorted(checkpoint.glob("pytorch_model*.bin"))
    if not files:
        raise EgptError(f"no weights (*.safetensors or pytorch_model*.bin) in {checkpoint}; point --model at an EventGPT checkpoint directory.")
    return _regular_files(files)


def _regular_files(files: list[Path]) -> list[Path]:
    for path in files:
        if path.exists() and not path.is_file():  # a FIFO named model.safetensors blocked the load forever
            raise EgptError(f"weights file {path} is not a regular file; re-download the checkpoint.")
    return files


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir (safetensors shards or .bin shards), on the CPU."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(checkpoint):
        if not path.exists():
            raise EgptError(f"weights file {path} is listed in the index but missing; re-download the checkpoint.")
        try:
            if path.suffix == ".safetensors":
                tensors.update(load_file(str(path)))
            else:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as error:  # safetensors/torch raise many types for a damaged file
            raise EgptError(f"weights file {path} is truncated or corrupt ({type(error).__name__}); re-download it.") from None
    return tensors


def read_config(checkpoint: Path, presets: tuple[str, ...] = ()) -> dict:
    """config.json of an EventGPT checkpoint dir, checked; `presets` only lists alternatives in the messages."""
    alternatives = f" or a preset ({', '.join(presets)})" if presets else ""
    if not checkpoint.exists():
        raise EgptError(f"model path {checkpoint} does not exist; pass a checkpoint dir{alternatives}.")
    if not checkpoint.is_dir():
        raise EgptError(f"model path {checkpoint} is not a directory; pass an EventGPT checkpoint dir{alternatives}.")
    config_path = checkpoint / "config.json"
    if not config_path.exists():
        raise EgptError(f"{checkpoint} has no config.json; point --model at an EventGPT checkpoint directory.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EgptError(f"{config_path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    except (UnicodeDecodeError, RecursionError) as error:
        raise EgptError(f"{config_path} is not readable JSON ({type(error).__name__}); re-download the checkpoint.") from None
    if not isinstance(config, dict):
        raise EgptError(f"{config_path} holds a JSON {type(config).__name__}, not an object; re-download the checkpoint.")
    if config.get("model_type") != "EventChat_llama":
        raise EgptError(f"{config_path} has model_type {config.get('model_type')!r}, expected 'EventChat_llama' (EventGPT), "
                        "'llava' (LLaVA-1.5) or 'video_llava' (Video-LLaVA); point --model at one of those checkpoints.")
    if config.get("use_event_qformer"):
        raise EgptError(f"{config_path} sets use_event_qformer, which EventGPT never implemented; remove the key or use a checkpoint without it.")
    return config


def check_checkpoint(checkpoint: Path, presets: tuple[str, ...] = (), vision_tower: Path | None = None) -> None:
    """Cheap checks of a checkpoint dir and --vision-tower, before any weights are read."""
    read_config(checkpoint, presets)
    weight_files(checkpoint)
    check_vision_tower_override(vision_tower)


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, weights: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """Load `weights` into `module`, refusing missing tensors and shapes the config does not imply."""
    expected = module.state_dict()
    missing = sorted(k for k in set(expected) - set(weights) if not k.endswith("position_ids"))
    if missing:
        raise EgptError(f"{where} lacks {len(missing)} weight(s), e.g. {missing[0]}; the checkpoint is truncated or not EventGPT.")
    for key, value in weights.items():
        target = expected.get(key)
        if target is not None and tuple(target.shape) != tuple(value.shape):
            raise EgptError(f"{where}: weight {key} has shape {tuple(value.shape)}, the config implies {tuple(target.shape)}; config and weights disagree.")
    module.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False, assign=assign)


def load_tower(config: dict, tensors: dict[str, torch.Tensor], checkpoint: Path,
               override: Path | None) -> tuple[nn.Module, Path | None]:
    """The CLIP vision tower (embedded weights, else its directory) and the directory that configured it, if any."""
    from transformers import CLIPVisionModel

    value = config.get("mm_visual_tower", "")
    # EventGPT saved CLIPVisionModel's keys as vision_model.*; transformers 5 names them without that prefix.
    weights = {k.removeprefix("vision_model."): v for k, v in _take(tensors, TOWER_PREFIX).items()}
    if weights:
        tower_dir = locate_vision_tower(value, checkpoint, override)
        tower = CLIPVisionModel(embedded_tower_config(value, weights, tower_dir))
        load_strict(tower, weights, f"{checkpoint} ({TOWER_PREFIX}*)")
        return tower, tower_dir
    tower_dir = find_vision_tower(value, checkpoint, override)
    try:
        return CLIPVisionModel.from_pretrained(str(tower_dir), dtype=torch.float32), tower_dir
    except Exception as error:  # transformers raises OSError/ValueError/KeyError for broken dirs
        first_line = (str(error).strip().splitlines() or [""])[0]  # torch's pickle refusal runs on for lines
        raise EgptError(f"could not load the CLIP vision tower from {tower_dir} ({type(error).__name__}: {first_line}).") from None


def load_projector_and_adaptor(config: dict, tensors: dict[str, torch.Tensor],
                               checkpoint: Path) -> tuple[nn.Sequential, nn.Linear | None]:
    """Linear → GELU → Linear projector, and the feature adaptor when the config enables it."""
    weights, adaptor_weights = _take(tensors, PROJECTOR_PREFIX), _take(tensors, ADAPTOR_PREFIX)
    if "event_feature_adaptor" in config and not adaptor_weights:
        raise EgptError(f"{checkpoint} config enables event_feature_adaptor but the weights lack {ADAPTOR_PREFIX}*; the checkpoint is incomplete.")
    missing = [n for n in ("0.weight", "0.bias", "2.weight", "2.bias") if n not in weights]
    if missing:
        raise EgptError(f"checkpoint {checkpoint} lacks {PROJECTOR_PREFIX}{missing[0]}; the weights are incomplete.")
    first, second = weights["0.weight"], weights["2.weight"]
    projector = nn.Sequential(nn.Linear(first.shape[1], first.shape[0]), nn.GELU(), nn.Linear(second.shape[1], second.shape[0]))
    projector.load_state_dict(weights)
    if not adaptor_weights:
        return projector, None
    adaptor = nn.Linear(adaptor_weights["weight"].shape[1], adaptor_weights["weight"].shape[0])
    adaptor.load_state_dict(adaptor_weights)
    return projector, adaptor


def load_llm(config: dict, tensors: dict[str, torch.Tensor], checkpoint: Path) -> nn.Module:
    """The Llama LLM: built on the meta device from the config, its weights assigned (no second copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm_config = {k: v for k, v in config.items() if k not in NOT_LLAMA_KEYS}
    if llm_config.get("rope_scaling") is None:
        llm_config.pop("rope_scaling", None)  # Vicuna configs carry an explicit null; transformers 5 deprecates the key
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise EgptError(f"checkpoint {checkpoint} lacks model.embed_tokens.weight; the weights are incomplete.")
    llm_config.update(vocab_size=embed.shape[0], hidden_size=embed.shape[1])
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**llm_config))
    weights = {k: v for k, v in tensors.items() if k.startswith(LLM_PREFIXES)}
    if "lm_head.weight" not in weights and llm.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    load_strict(llm, weights, str(checkpoint), assign=True)
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=llm.config)  # buffers were on meta
    return llm


def load_eventgpt_checkpoint(checkpoint: Path, dtype: torch.dtype, device: torch.device, vision_tower: Path | None = None,
                             allow_tokenizer_mismatch: bool = False) -> EventGPT:
    """Load an EventGPT checkpoint dir with transformers only (no EventGPT code).

    A tokenizer that encodes the prompt template unlike the checkpoint's `tokenizer.model` is an error,
    or with `allow_tokenizer_mismatch` recorded as `model.tokenizer_mismatch`.
    """
    config = read_config(checkpoint)
    check_vision_tower_override(vision_tower)
    tensors = read_state_dict(checkpoint)
    tower, tower_dir = load_tower(config, tensors, checkpoint, vision_tower)
    projector, adaptor = load_projector_and_adaptor(config, tensors, checkpoint)
    llm = load_llm(config, tensors, checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint, llm.config)
    mismatch = guard_tokenizer(tokenizer, checkpoint, TEMPLATE, allow_tokenizer_mismatch)
    model = EventGPT(llm, tower, projector, adaptor, tokenizer, make_image_processor(tower.config.image_size, tower_dir),
                     TEMPLATE, name=str(checkpoint))
    model.tokenizer_mismatch = mismatch
    model.llm.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(device=device, dtype=dtype).eval()
