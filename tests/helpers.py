"""Tiny in-process fixtures: a sentencepiece Llama tokenizer, a random EventGPT, a real-format checkpoint.

Everything is built on the CPU in float32 from fixed seeds in well under a second; nothing touches
the network or the model hub.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import torch
from torch import nn

from egpt_speed.eventgpt import EventGPT
from egpt_speed.tokenizers import sentencepiece_llama_tokenizer
from egpt_speed.vision_tower import make_image_processor
from egpt_speed.prompt import VICUNA_SYSTEM, PromptTemplate

QUESTIONS_JSON = Path(__file__).resolve().parents[1] / "egpt_speed" / "resources" / "dsec_top50_questions.json"
TOWER_NAME = "clip-vit-tiny-patch14-28"  # the checkpoint's mm_visual_tower
IMAGE_SIZE, PATCH_SIZE = 28, 14  # → 2×2 patches + CLS = 5 tokens per frame
VOCAB_SIZE = 400
# What make_tiny_eventgpt's tower is, as an entry of vision_tower.KNOWN_CLIP_TOWERS would state it.
TINY_TOWER_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         patch_size=PATCH_SIZE, image_size=IMAGE_SIZE, projection_dim=512)

GENERIC_TEXT = """
The scene shows a road with cars, a cyclist and a pedestrian crossing near a traffic light. Buildings line
both sides of the street and trees cast shadows on the sidewalk. A truck is parked beside a fence while a bus
moves towards the intersection. The camera is mounted on a vehicle driving through a city at night, and the
event sensor records changes of brightness as red and blue dots. Moving objects produce dense edges; static
background produces few events. In the distance there are mountains, a bridge over a river and a tunnel.
People walk their dogs in the park, children play, and a man rides a motorcycle past a parking lot.
The weather is clear, the sky is dark, and street lamps light the lanes. Signs show the speed limit and the
direction of the highway. What are the key elements in this scene? Describe the objects, their colors,
shapes, positions and motion. Is there any vehicle turning left or right? How many people can you see?
The answer should be helpful, detailed and polite, mentioning the main structures, the layout of the road,
the lane markings, the curb, the houses with windows and doors, and any animals or obstacles on the way.
One two three four five six seven eight nine ten. Yes, no, maybe. It appears that the car is stopping.
"""


def _corpus() -> list[str]:
    questions = [entry["question"] for entry in json.loads(QUESTIONS_JSON.read_text())]
    lines = [line.strip() for line in GENERIC_TEXT.strip().splitlines()]
    prompt_bits = [VICUNA_SYSTEM, "USER: <ev_start><event><ev_end> ASSISTANT:"]
    return (questions + lines + prompt_bits) * 3


@functools.lru_cache(maxsize=2)
def sentencepiece_model_bytes(normalization: str = "identity") -> bytes:
    """A BPE sentencepiece model with Llama's conventions (unk 0, bos 1 <s>, eos 2 </s>), trained once per session.

    normalization: Vicuna's `identity`, or e.g. `nmt_nfkc`, which turns "\\n" into "▁" (transformers ignores it).
    """
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buffer, vocab_size=VOCAB_SIZE, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True, split_digits=True,
        normalization_rule_name=normalization, remove_extra_whitespaces=False, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return buffer.getvalue()


def write_sentencepiece_files(directory: Path, normalization: str = "identity") -> Path:
    """What a slow (sentencepiece) Llama tokenizer saves, as EventGPT/Vicuna checkpoints ship it: no tokenizer.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(sentencepiece_model_bytes(normalization))

    def token(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>"), "pad_token": token("<unk>"),
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right",
        "sp_model_kwargs": {}}, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=1))
    return directory


def make_sp_tokenizer(directory: Path, normalization: str = "identity"):
    """Train (once per session) and save a tiny Llama sentencepiece tokenizer in `directory`; return it loaded.

    The dir gets tokenizer.model, special_tokens_map.json, and the tokenizer.json + tokenizer_config.json
    transformers 5 writes, so `AutoTokenizer.from_pretrained(directory)` loads it as a LlamaTokenizer even
    without protobuf (which transformers needs to convert a bare tokenizer.model). `normalization`: see
    `sentencepiece_model_bytes`; the saved tokenizer.json ignores it, as transformers 5 does.
    """
    from transformers import AutoTokenizer

    directory = write_sentencepiece_files(directory, normalization)
    sentencepiece_llama_tokenizer(directory).save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def make_tiny_eventgpt(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int | None = None, tokenizer=None,
                       template: str = "eventgpt_v1", *, vision_hidden: int = 32, vision_heads: int = 2) -> EventGPT:
    """A random float32 EventGPT on the CPU: Llama (4 heads) + CLIP (1 layer, 28 px, patch 14) + projector + adaptor."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        import tempfile

        tokenizer = make_sp_tokenizer(Path(tempfile.mkdtemp(prefix="egpt-tok-")))
    vocab = vocab or len(tokenizer)
    llm_config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                             initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             tie_word_embeddings=False)
    tower_config = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=1,
                                    num_attention_heads=vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(llm_config)
        tower = CLIPVisionModel(tower_config)
        projector = nn.Sequential(nn.Linear(vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        adaptor = nn.Linear(hidden, hidden)
    llm.generation_config.pad_token_id = 0
    llm.generation_config.eos_token_id = 2
    llm.generation_config.bos_token_id = 1
    model = EventGPT(llm, tower, projector, adaptor, tokenizer, make_image_processor(IMAGE_SIZE),
                     PromptTemplate(template), name=f"tiny-test-{seed}")
    return model.to(dtype=torch.float32).eval()


def _tower_state(model: EventGPT) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.vision_tower.state_dict().items() if not k.endswith("position_ids")}


def write_clip_dir(directory: Path, model: EventGPT) -> Path:
    """A full CLIP vision dir like `clip-vit-large-patch14-336`: config, weights (`vision_model.*`), processor config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.vision_tower.config.save_pretrained(str(directory))
    # keys as the released CLIP dirs (and transformers < 5) name them: vision_model.*
    save_file({f"vision_model.{k}": v.contiguous() for k, v in _tower_state(model).items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.image_processor.save_pretrained(str(directory))
    return Path(directory)


def eventgpt_config(model: EventGPT) -> dict:
    """config.json as EventGPT's training code saved it: a Llama config with model_type EventChat_llama + extras."""
    llm = model.llm.config
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1.5", "architectures": ["EventChatLlamaForCausalLM"],
        "model_type": "EventChat_llama", "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads, "vocab_size": llm.vocab_size, "hidden_act": "silu",
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
        "initializer_range": llm.initializer_range, "rope_scaling": None, "rope_theta": 10000.0,
        "attention_bias": False, "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
        "transformers_version": "4.31.0", "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "mm_visual_tower": TOWER_NAME, "event_feature_adaptor": True, "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
    }


def checkpoint_tensors(model: EventGPT, tower_in_checkpoint: bool = True) -> dict[str, torch.Tensor]:
    """The EventGPT state dict keys: plain Llama + model.visual_projector/feature_adaptor (+ the tower)."""
    tensors = {k: v for k, v in model.llm.state_dict().items()}
    tensors.update({f"model.visual_projector.{k}": v for k, v in model.projector.state_dict().items()})
    tensors.update({f"model.feature_adaptor.{k}": v for k, v in model.adaptor.state_dict().items()})
    if tower_in_checkpoint:
        tensors.update({f"model.visual_tower.visual_tower.vision_model.{k}": v for k, v in _tower_state(model).items()})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    from safetensors.torch import save_file

    if not sharded:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for index, part in enumerate(halves, start=1):
        name = f"model-{index:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_eventgpt_checkpoint(directory: Path, seed: int = 0, tower_in_checkpoint: bool = True, *,
                              sharded: bool = False, tower_dir: bool = True, model: EventGPT | None = None,
                              normalization: str = "identity") -> Path:
    """An EventGPT checkpoint dir in the released format, from `make_tiny_eventgpt(seed)` (or `model`).

    tower_in_checkpoint: the CLIP weights live under `model.visual_tower.visual_tower.vision_model.*`.
    tower_dir: a CLIP dir named like `mm_visual_tower` is written beside it (required by a checkpoint
    without the tower; without it an embedded tower's head count is known only for the named OpenAI CLIPs).
    The tokenizer is the bare sentencepiece model + configs (no tokenizer.json), as Vicuna ships it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_sentencepiece_files(directory, normalization)
    with_dir = tower_dir or not tower_in_checkpoint
    if model is None:
        model = make_tiny_eventgpt(seed, tokenizer=sentencepiece_llama_tokenizer(directory))
    (directory / "config.json").write_text(json.dumps(eventgpt_config(model), indent=1))
    write_weights(directory, checkpoint_tensors(model, tower_in_checkpoint), sharded)
    if with_dir:
        write_clip_dir(directory.parent / TOWER_NAME, model)
    return directory
