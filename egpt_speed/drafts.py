"""Draft models for speculative strategies: presets, paths, and the shared-tokenizer check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from egpt_speed.errors import EgptError
from egpt_speed.llava_family import FAMILIES
from egpt_speed.presets import PRESET_FAMILIES, PRESETS

TINY_TRUNCATED_LAYERS = 8


@dataclass
class Draft:
    """A loaded draft: its LM and whether it conditions on the multimodal prefix."""

    llm: nn.Module
    multimodal: bool  # True: sees the spliced event prefix (same width as the target)
    name: str
    eventgpt: object | None = None  # the draft's own EventGPT when it is one (its own vision stack)
    head: object | None = None  # an EAGLE head drafting from the target's features (llm is then the target's)
    # a draft of another model family: it runs its own Stages 1–3 (its modality) on each sample
    own_stages: object | None = None  # the draft's multimodal model (EventGPT or LlavaFamilyModel)
    token_map: object | None = None  # cross_modal.TokenMap between the target's ids and the draft's

    @property
    def family(self) -> str | None:
        model = self.own_stages if self.own_stages is not None else self.eventgpt
        return getattr(model, "family", None)


def layer_truncated_view(llm, num_layers: int):
    """The first `num_layers` decoder layers + final norm + LM head of `llm`, sharing its weights.

    No copy: the view's modules are the target's own, so it costs no memory; it keeps its own KV
    cache because it is called with its own Cache object.
    """
    from transformers import AutoModelForCausalLM

    total = llm.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise EgptError(f"--exit-layer must be between 1 and {total - 1} for this model (got {num_layers}).")
    config = llm.config.__class__.from_dict(llm.config.to_dict())
    config.num_hidden_layers = num_layers
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(config)
    view.model.embed_tokens = llm.model.embed_tokens
    view.model.layers = nn.ModuleList(llm.model.layers[:num_layers])
    view.model.norm = llm.model.norm
    view.model.rotary_emb = llm.model.rotary_emb
    view.lm_head = llm.lm_head
    view.config._attn_implementation = llm.config._attn_implementation
    return view.eval()


def random_draft_68m(device: torch.device, dtype: torch.dtype, vocab_size: int = 32000):
    """vicuna-68m's shape (2 layers, hidden 768, 12 heads), random weights: for cost ratios only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def check_shared_tokenizer(target, draft_llm, draft_tokenizer, draft_name: str) -> None:
    """A draft must speak the target's token ids: same vocab size and same BOS/EOS ids."""
    target_vocab = target.llm.get_output_embeddings().weight.shape[0]
    draft_vocab = draft_llm.get_output_embeddings().weight.shape[0]
    if target_vocab != draft_vocab:
        raise EgptError(f"draft {draft_name} has a vocabulary of {draft_vocab} ids but the target has {target_vocab}; "
                        "a draft must share the target's tokenizer.")
    if draft_tokenizer is not None:
        for attribute in ("bos_token_id", "eos_token_id"):
            ours, theirs = getattr(target.tokenizer, attribute), getattr(draft_tokenizer, attribute)
            if ours is not None and theirs is not None and ours != theirs:
                raise EgptError(f"draft {draft_name} has {attribute} {theirs} but the target has {ours}; "
                                "a draft must share the target's tokenizer.")


def shipped_head_dir(name: str) -> Path:
    """Draft heads shipped inside the package (egpt_speed/resources/<name>)."""
    return Path(__file__).parent / "resources" / name


def shipped_head_present(name: str) -> bool:
    """Our head layout (eagle_config.json) or a public EAGLE-1 / EAGLE-3 one (config.json + weights)."""
    from egpt_speed.eagle_formats import detect_format

    directory = shipped_head_dir(name)
    return (directory / "eagle_config.json").exists() or (directory.is_dir() and detect_format(directory) is not None)


DRAFT_PRESETS = ("target", "tiny-eagle", "tiny-truncated", "synthetic-68m")


def check_draft_spec(spec: str | None, model_spec: str) -> None:
    """Before any model loads: --draft names a draft preset, a model preset, the target, or an existing dir."""
    if spec is None or spec in DRAFT_PRESETS or spec in PRESETS or spec == model_spec:
        return
    path = Path(spec)
    if not path.is_dir():
        raise EgptError(f"--draft {spec!r} is neither a preset ({', '.join(DRAFT_PRESETS + PRESETS)}) nor an existing "
                        "dir; pass a head, causal-LM or checkpoint dir.")


def default_draft_for(model_spec: str) -> str:
    if model_spec == "tiny":
        return "tiny-eagle" if shipped_head_present("tiny-eagle") else "tiny-truncated"
    if model_spec in ("synthetic-7b", "synthetic-llava-7b", "synthetic-video-llava-7b"):
        return "synthetic-68m"
    if model_spec in ("tiny-llava", "tiny-video-llava"):
        return "tiny"  # cross-modal: the EventGPT preset with the same language model reads the events
    raise EgptError("speculative strategies on a checkpoint need --draft PATH (a causal LM sharing the target's "
                    "tokenizer, an EventGPT, LLaVA or Video-LLaVA checkpoint), or --draft target to check the loop.")


def load_draft(spec: str | None, target, model_spec: str, device: torch.device, dtype: torch.dtype) -> Draft:
    """`target`, a preset (tiny-truncated, synthetic-68m), an EventGPT checkpoint, or a HF causal-LM dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from egpt_speed.models import load_eventgpt_checkpoint, tiny_llm_dir

    from egpt_speed.eagle import EagleHead, is_head_dir, read_head_meta

    spec = spec or default_draft_for(model_spec)
    head_dir = shipped_head_dir(spec) if spec == "tiny-eagle" else Path(spec)
    if is_head_dir(head_dir):
        meta = read_head_meta(head_dir)
        width = meta["llama_config"]["hidden_size"]
        if width != target.hidden_size:
            raise EgptError(f"draft head {head_dir} was trained for hidden size {width} but the target has {target.hidden_size}; "
                            "train one for this target with `egpt-speed train-draft`.")
        return Draft(target.llm, multimodal=True, name=spec, head=EagleHead.load(head_dir, device, dtype))
    from egpt_speed.eagle_formats import detect_format, load_public_head

    if head_dir.is_dir() and detect_format(head_dir) is not None:  # a public EAGLE-1 / EAGLE-3 head
        vocab = target.llm.get_output_embeddings().weight.shape[0]
        head = load_public_head(head_dir, target.hidden_size, vocab, device, dtype)
        return Draft(target.llm, multimodal=True, name=spec, head=head)
    if spec == "tiny-eagle":
        raise EgptError("the tiny-eagle head is not shipped in this install; train one with `egpt-speed train-draft --model tiny`.")
    if spec in ("target", model_spec):
        return Draft(target.llm, multimodal=True, name="target")
    if spec in PRESETS and PRESET_FAMILIES.get(spec, "eventgpt") != target.family:
        return cross_modal_draft(spec, target, device, dtype)  # e.g. --model tiny-video-llava --draft tiny
    if spec == "tiny-truncated":
        llm = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir()), num_hidden_layers=TINY_TRUNCATED_LAYERS,
                                                   dtype=dtype).to(device).eval()
        check_shared_tokenizer(target, llm, None, spec)
        return Draft(llm, multimodal=False, name=spec)
    if spec == "synthetic-68m":
        vocab = target.llm.get_output_embeddings().weight.shape[0]
        return Draft(random_draft_68m(device, dtype, vocab), multimodal=False, name=spec)
    path = Path(spec)
    if not (path / "config.json").exists():
        raise EgptError(f"draft {spec!r} is neither a preset ({', '.join(DRAFT_PRESETS + PRESETS)}) nor a model dir with config.json.")
    import json

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "EventChat_llama" and target.family == "eventgpt":
        draft_model = load_eventgpt_checkpoint(path, dtype, device)
        check_shared_tokenizer(target, draft_model.llm, draft_model.tokenizer, spec)
        return Draft(draft_model.llm, multimodal=True, name=spec, eventgpt=draft_model)
    if model_type == "EventChat_llama" or model_type in FAMILIES:
        return cross_modal_draft(spec, target, device, dtype)
    try:
        llm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False) if any(path.glob("tokenizer*")) else None
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise EgptError(f"could not load draft {path} ({type(error).__name__}: {first_line}).") from None
    check_shared_tokenizer(target, llm, tokenizer, spec)
    return Draft(llm, multimodal=False, name=spec)


def cross_modal_draft(spec: str, target, device: torch.device, dtype: torch.dtype) -> Draft:
    """A multimodal draft (preset or dir) of another family, or any LLaVA-family draft: it reads its own view of
    each sample through its own Stages 1–3; its ids are mapped onto the target's (`cross_modal.text_vocab_map`)."""
    from egpt_speed.cross_modal import text_vocab_map
    from egpt_speed.models import load_model

    draft_model = load_model(spec, dtype, device)
    token_map = text_vocab_map(target.tokenizer, target.llm.get_output_embeddings().weight.shape[0],
                               draft_model.tokenizer, draft_model.llm.get_output_embeddings().weight.shape[0], spec)
    return Draft(draft_model.llm, multimodal=True, name=spec, own_stages=draft_model, token_map=token_map)
