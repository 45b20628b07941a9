"""LLaVA-1.5 and Video-LLaVA (transformers' own checkpoints) behind the interface Stages 2–4 use for EventGPT.

A checkpoint dir with ``model_type`` ``llava`` (``LlavaForConditionalGeneration``) or ``video_llava``
(``VideoLlavaForConditionalGeneration``) loads with transformers alone. The adapter exposes what the
stages and every Stage-4 strategy read from an EventGPT: ``llm`` (a causal LM *view* whose decoder
and LM head are the checkpoint's own modules, no weight copy), ``splice``, ``encode_frames`` +
``pool`` (Stage 3), ``tokenizer``, ``device``, ``hidden_size``, and the vision modules.

Stage 1 (``load_clip_frames``): LLaVA sees one RGB frame, Video-LLaVA eight, both from the clip's
``video/<seq>/<clip>/`` folder of the DSEC-derived layout (see ``video_folder_for``).
Stage 2 (``LlavaFamilyModel.preprocess``): the checkpoint's own processor and chat template; the run
of ``<image>``/``<video>`` tokens the processor expands is collapsed to the −200 placeholder, so
``splice`` puts the Stage-3 features exactly where transformers' ``masked_scatter`` would.
Stage 3: vision tower → projector (``get_image_features`` / ``get_video_features``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from egpt_speed.errors import EgptError
from egpt_speed.eventgpt import SplicingModel
from egpt_speed.prompt import EVENT_TOKEN_INDEX

FAMILIES = ("llava", "video_llava")
FRAMES = {"llava": 1, "video_llava": 8}  # Video-LLaVA was trained on 8 frames per video
PLACEHOLDER = {"llava": "<image>", "video_llava": "<video>"}
# Used only when a checkpoint ships no chat template: the prompts of the llava-hf / LanguageBind model cards.
FALLBACK_PROMPT = {"llava": "USER: <image>\n{query} ASSISTANT:", "video_llava": "USER: <video>\n{query} ASSISTANT:"}
VIDEO_DIR, MP4_DIR, EVENT_DIR = "video", "mp4", "event_npy"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------------------------
# Checkpoint checks (cheap: before any weights load)
# ----------------------------------------------------------------------------------------------

def read_model_type(checkpoint: Path) -> str | None:
    """The ``model_type`` of a dir's config.json, or None when there is no readable config."""
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_llava_checkpoint(checkpoint: Path) -> str:
    """The family (``llava`` / ``video_llava``) of a checkpoint dir, or a clear EgptError."""
    checkpoint = Path(checkpoint)
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise EgptError(f"{checkpoint} has no config.json; point --model at a LLaVA or Video-LLaVA checkpoint dir.")
    try:
        family = json.loads(config_path.read_text()).get("model_type")
    except ValueError as error:
        raise EgptError(f"{config_path} is not valid JSON ({error}); re-download the checkpoint.") from None
    if family not in FAMILIES:
        raise EgptError(f"{config_path} has model_type {family!r}, expected one of {', '.join(FAMILIES)}.")
    if not (any(checkpoint.glob("*.safetensors")) or any(checkpoint.glob("pytorch_model*.bin"))):
        raise EgptError(f"no weights (*.safetensors or pytorch_model*.bin) in {checkpoint}; the checkpoint is incomplete.")
    if not any((checkpoint / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise EgptError(f"{checkpoint} has no tokenizer.json or tokenizer.model; save the processor with the model.")
    if not (checkpoint / "preprocessor_config.json").exists() and not (checkpoint / "processor_config.json").exists():
        raise EgptError(f"{checkpoint} has no preprocessor_config.json; save the processor with the model.")
    return family


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------

@dataclass
class ProcessorParts:
    """What Stage 2 needs from a checkpoint's processor files."""

    processor: Any | None  # the full transformers processor, when it can be built here
    tokenizer: Any
    image_processor: Any  # frames → pixel_values when `processor` is None (and for the record)
    chat_template: str | None


def causal_lm_view(multimodal: nn.Module) -> nn.Module:
    """A ``*ForCausalLM`` whose decoder and LM head are the multimodal checkpoint's own modules.

    Built on the meta device (no allocation), then the checkpoint's language model and lm_head are
    put in: one set of weights, so strategies that quantise or switch attention on ``llm`` act on
    the target itself. The config object is the language model's own, for the same reason.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    language_model = multimodal.model.language_model
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(language_model.config)
    view.model = language_model
    view.lm_head = multimodal.lm_head
    view.config = language_model.config
    view.generation_config = GenerationConfig.from_dict(multimodal.generation_config.to_dict())
    return view.eval()


class LlavaFamilyModel(SplicingModel):
    """A LLaVA-1.5 or Video-LLaVA checkpoint seen through the EventGPT interface of the stages."""

    placeholder_name = "visual"
    adaptor = None  # EventGPT's feature adaptor has no counterpart here
    template = None  # prompts come from the checkpoint's chat template, see `prompt_text`
    fold_to_vocab = None

    def __init__(self, multimodal: nn.Module, parts: ProcessorParts, family: str, name: str,
                 random_weights: bool = False, fold_to_vocab: int | None = None):
        super().__init__()
        if family not in FAMILIES:
            raise EgptError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}.")
        self.multimodal = multimodal
        self.llm = causal_lm_view(multimodal)
        self.family = family
        self.frames = FRAMES[family]
        self.parts = parts
        self.tokenizer = parts.tokenizer
        self.image_processor = parts.image_processor
        self.name = name
        self.random_weights = random_weights
        self.fold_to_vocab = fold_to_vocab
        config = multimodal.config
        self.placeholder_id = int(config.image_token_id if family == "llava" else config.video_token_id)
        self.vision_tower = multimodal.model.vision_tower if family == "llava" else multimodal.model.video_tower
        self.projector = multimodal.model.multi_modal_projector
        self.max_context = int(config.text_config.max_position_embeddings)
        if self.llm.generation_config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            self.llm.generation_config.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    # ---- Stage 2 -------------------------------------------------------------------------------

    def prompt_text(self, question: str) -> str:
        """The chat-templated prompt holding one ``<image>`` / ``<video>`` placeholder."""
        template = self.parts.chat_template
        if template is None:
            return FALLBACK_PROMPT[self.family].format(query=question)
        content = [{"type": "image" if self.family == "llava" else "video"}, {"type": "text", "text": question}]
        conversation = [{"role": "user", "content": content}]
        if self.parts.processor is not None:
            return self.parts.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.apply_chat_template(conversation, chat_template=template, add_generation_prompt=True,
                                                  tokenize=False)

    def prompt_ids(self, question: str) -> torch.Tensor:
        """Stage 2's text half alone (for callers without frames, e.g. train-draft): [L] with one −200, on the device."""
        ids = self.tokenizer(self.prompt_text(question), return_tensors="pt")["input_ids"][0]
        return self.fold_ids(collapse_placeholder(ids, self.placeholder_id)).to(self.device)

    def fold_ids(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """A synthetic preset borrows a larger tokenizer than its vocabulary: fold its ids in (−200 kept)."""
        if self.fold_to_vocab is None:
            return prompt_ids
        return torch.where(prompt_ids == EVENT_TOKEN_INDEX, prompt_ids, prompt_ids % self.fold_to_vocab)

    def preprocess(self, frames: list[np.ndarray], question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: frames ([H, W, 3] uint8 each) + question → (pixel_values [T, 3, S, S], prompt_ids [L]).

        With the full processor, its own output; without it (Video-LLaVA's video processor needs
        torchvision), the checkpoint's image processor per frame and its tokenizer, which is what
        the processor does with the same config.
        """
        if len(frames) != self.frames:
            raise EgptError(f"{self.family} takes {self.frames} frame(s) per sample, got {len(frames)}.")
        prompt = self.prompt_text(question)
        processor = self.parts.processor
        if processor is not None and self.family == "llava":
            out = processor(text=prompt, images=list(frames), return_tensors="pt")
            ids, pixel_values = out["input_ids"][0], out["pixel_values"]
        elif processor is not None:
            out = processor(text=prompt, videos=[np.stack(frames)], return_tensors="pt")
            ids, pixel_values = out["input_ids"][0], out["pixel_values_videos"][0]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0]  # as the processor tokenises
            out = self.image_processor(images=list(frames), return_tensors="pt")
            # VideoLlavaImageProcessor still names its output pixel_values_images unless told otherwise
            pixel_values = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]
        prompt_ids = self.fold_ids(collapse_placeholder(ids, self.placeholder_id))
        pixel_values = pixel_values.to(device=self.device, dtype=self.llm.dtype, non_blocking=True)
        return pixel_values, prompt_ids.to(self.device, non_blocking=True)

    # ---- Stage 3 -------------------------------------------------------------------------------

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower → projector, exactly as the checkpoint's forward does.

        pixel_values: [T, 3, S, S] → [T, P, H]; LLaVA drops CLS ("default" strategy, P = 576 at
        336 px), Video-LLaVA keeps it (P = 257 per 224-px frame).
        """
        config = self.multimodal.config
        tower_dtype = next(self.vision_tower.parameters()).dtype
        if self.family == "llava":
            out = _features(self.multimodal.model.get_image_features, pixel_values=pixel_values.to(tower_dtype),
                            vision_feature_layer=config.vision_feature_layer,
                            vision_feature_select_strategy=config.vision_feature_select_strategy)
        else:
            out = _features(self.multimodal.model.get_video_features,
                            pixel_values_videos=pixel_values.to(tower_dtype).unsqueeze(0),
                            vision_feature_layer=config.vision_feature_layer)
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    @staticmethod
    def pool(frame_features: torch.Tensor) -> torch.Tensor:
        """No pooling: every frame's tokens in order, as the processor expands the placeholder.

        frame_features: [T, P, H] → [T * P, H].
        """
        return frame_features.reshape(-1, frame_features.shape[-1])


def _features(method, **inputs):
    """A get_image/video_features call across transformers 5.x: newer ones return an output whose
    pooler_output holds the projected features (with return_dict); older ones return the features,
    Video-LLaVA's as (features, num_frames)."""
    try:
        out = method(**inputs, return_dict=True)
    except TypeError:  # a signature without return_dict
        out = method(**inputs)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], int):
        out = out[0]
    return out


def collapse_placeholder(ids: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """Replace the one run of ``placeholder_id`` (1 or N copies) by a single −200.

    ids: [L] → [L - run + 1]. More than one run (two images) is refused: Stage 3 encodes one clip.
    """
    is_placeholder = ids == placeholder_id
    starts = is_placeholder & ~torch.cat([is_placeholder.new_zeros(1), is_placeholder[:-1]])
    runs = int(starts.sum())
    if runs != 1:
        raise EgptError(f"the prompt must hold one run of visual placeholder tokens (id {placeholder_id}), found {runs}; "
                        "check the checkpoint's chat template.")
    keep = ~is_placeholder | starts
    collapsed = ids[keep].clone()
    collapsed[collapsed == placeholder_id] = EVENT_TOKEN_INDEX
    return collapsed


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _chat_template(checkpoint: Path, tokenizer) -> str | None:
    jinja = checkpoint / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json"):
        path = checkpoint / name
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except ValueError:
                raise EgptError(f"{path} is not valid JSON; re-download the checkpoint.") from None
            if template:
                return template
    return getattr(tokenizer, "chat_template", None)


def load_processor_parts(checkpoint: Path, family: str) -> ProcessorParts:
    """The checkpoint's processor, or its tokenizer + image processor where the processor cannot be built.

    transformers 5 builds Video-LLaVA's video processor on torchvision; without torchvision the
    processor class refuses to construct, while its PIL ``VideoLlavaImageProcessor`` (same resize,
    crop and normalisation config) still loads.
    """
    from transformers import AutoProcessor, AutoTokenizer

    checkpoint = Path(checkpoint)
    try:
        processor = AutoProcessor.from_pretrained(str(checkpoint), trust_remote_code=False)
    except (ImportError, AttributeError, OSError, ValueError, TypeError):
        processor = None  # the video processor's torchvision requirement surfaces as any of these
    if isinstance(processor, _processor_class(family)):
        return ProcessorParts(processor, processor.tokenizer, processor.image_processor,
                              _chat_template(checkpoint, processor.tokenizer) or getattr(processor, "chat_template", None))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False)
        image_processor = _image_processor(checkpoint, family)
    except (OSError, ValueError, TypeError) as error:
        raise EgptError(f"could not load the processor files of {checkpoint} ({type(error).__name__}: {error}).") from None
    return ProcessorParts(None, tokenizer, image_processor, _chat_template(checkpoint, tokenizer))


def _processor_class(family: str) -> type:
    """The processor class a family's checkpoint should load as (a tokenizer_config naming another one is ignored)."""
    from transformers import LlavaProcessor, VideoLlavaProcessor

    return LlavaProcessor if family == "llava" else VideoLlavaProcessor


def _image_processor(checkpoint: Path, family: str):
    import transformers

    if family == "video_llava":
        return transformers.VideoLlavaImageProcessor.from_pretrained(str(checkpoint))
    return clip_image_processor_class().from_pretrained(str(checkpoint))


def clip_image_processor_class() -> type:
    """The PIL CLIP image processor (CLIPImageProcessorPil where this transformers has it, else CLIPImageProcessor)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def load_llava_checkpoint(checkpoint: Path, dtype: torch.dtype, device: torch.device) -> LlavaFamilyModel:
    """Load a ``llava`` / ``video_llava`` checkpoint dir with transformers only, on the device."""
    from transformers import LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

    checkpoint = Path(checkpoint)
    family = check_llava_checkpoint(checkpoint)
    parts = load_processor_parts(checkpoint, family)
    cls = LlavaForConditionalGeneration if family == "llava" else VideoLlavaForConditionalGeneration
    try:
        multimodal = cls.from_pretrained(str(checkpoint), dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise EgptError(f"could not load {family} weights from {checkpoint} ({type(error).__name__}: {error}).") from None
    return LlavaFamilyModel(multimodal.to(device).eval(), parts, family, name=str(checkpoint)).eval()


# ----------------------------------------------------------------------------------------------
# Stage 1: the clip's RGB frames (DSEC-derived layout)
# ----------------------------------------------------------------------------------------------

def video_folder_for(spec) -> Path | None:
    """The clip's frame folder: ``spec.video_dir`` when the dataset reader sets it, else by the layout.

    The DSEC-derived sets pair ``event_npy/<seq>/<clip>.npy`` with ``video/<seq>/<clip>/`` (the
    DSEC left rectified frames of the same time window, original file names) and
    ``mp4/<seq>/<clip>.mp4``; the JSON's ``video_data`` is ``<seq>/<clip>`` relative to ``video/``
    and ``mp4_data`` ``<seq>/<clip>.mp4`` relative to ``mp4/``.
    """
    explicit = getattr(spec, "video_dir", None)
    if explicit is not None:
        return Path(explicit)
    event_path = getattr(spec, "event_path", None)
    if event_path is None:
        return None
    event_path = Path(event_path)
    for root in event_path.parents:
        if root.name == EVENT_DIR:
            return root.parent / VIDEO_DIR / event_path.relative_to(root).with_suffix("")
    return None


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread over ``total`` frames, first and last included (the benchmark's sampling)."""
    if total <= count:
        return list(range(total))
    if count == 1:
        return [(total - 1) // 2]  # the middle frame for a single-image model
    return [i * (total - 1) // (count - 1) for i in range(count)]


def load_clip_frames(spec, family: str) -> list[np.ndarray]:
    """Stage 1 for LLaVA (1 frame, the middle one) and Video-LLaVA (8 evenly spaced): [H, W, 3] uint8 each."""
    from PIL import Image

    folder = video_folder_for(spec)
    count = FRAMES[family]
    if folder is None or not folder.is_dir():
        raise EgptError(f"sample {spec.id} has no video frame folder ({folder}); {family} needs the dataset's "
                        f"{VIDEO_DIR}/<seq>/<clip>/ frames (--data synthetic writes them).")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if len(files) < count:
        raise EgptError(f"sample {spec.id}: {folder} holds {len(files)} frame(s), {family} needs {count}.")
    frames = []
    for index in evenly_spaced(len(files), count):
        try:
            with Image.open(files[index]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except OSError as error:
            raise EgptError(f"frame {files[index]} is not a readable image ({error}); re-create it.") from None
    return frames
