"""Public EAGLE head formats: import EAGLE-1 / EAGLE-3 head dirs, export ours for vLLM and SGLang.

Layouts (checked against vLLM `model_executor/models/llama_eagle.py`, `llama_eagle3.py` and SGLang
`srt/models/llama_eagle.py`, `llama_eagle3.py`; revisions in tests/test_eagle_formats.py):

- EAGLE-1: `config.json` (a LlamaConfig, one hidden layer) + `model.safetensors` or `pytorch_model.bin`
  with `fc.weight` [H, 2H] (+ optional `fc.bias`) applied to cat(token embedding, target feature) —
  embedding first, the reverse of our EagleHead's order — and `layers.0.*` without an input norm.
  The target's embedding and LM head are shared. It maps one-to-one onto EagleHead(input_norm=False).
- EAGLE-3: `fc.weight` [H, 3H] fuses three target layers' hidden states (the config's
  `eagle_config.eagle_aux_hidden_state_layer_ids`), `midlayer.*` whose q/k/v read
  cat(input_layernorm(embedding), hidden_norm(hidden)) (2H wide), `norm.weight`, its own
  `lm_head.weight` [K, H] over a draft vocabulary, `d2t` [K] (target id − draft index), `t2d` [V] mask.
  Eagle3Head below runs that forward; it drafts when the target passes the aux layers' inputs
  (speculation.DynamicTarget.capture_layers; layer id i = the input of decoder layer i, as vLLM's
  llama.py and the EAGLE repo capture them), and is converted with `egpt-speed export-draft`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from egpt_speed.decoding import CACHE_KWARG
from egpt_speed.eagle import EagleHead, causal_mask, is_head_dir, read_head_meta
from egpt_speed.errors import EgptError

EAGLE1, EAGLE3 = "eagle", "eagle3"
FORMATS = (EAGLE1, EAGLE3)
AUTO_FORMAT = "auto"  # the head's own layout: eagle3 for an EAGLE-3 head, else eagle
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EAGLE1_ARCHITECTURE = "LlamaForCausalLM"  # as EAGLE-1 heads on the hub; vLLM maps it to EagleLlamaForCausalLM
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"  # vLLM's registry and SGLang's EntryClass


# ------------------------------------------------------------------------------------------ reading


def weights_file(directory: Path) -> Path | None:
    return next((directory / name for name in WEIGHT_FILES if (directory / name).exists()), None)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = weights_file(directory)
    if path is None:
        raise EgptError(f"{directory} has no {' or '.join(WEIGHT_FILES)}; an EAGLE head dir needs its weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, weights_only=True, map_location="cpu")  # tensors only: never runs code
    except Exception as error:  # noqa: BLE001 - safetensors and unpickling raise several types
        raise EgptError(f"EAGLE head weights {path} could not be read ({type(error).__name__}); download them again.") from None


def tensor_names(directory: Path) -> set[str]:
    path = weights_file(directory)
    if path is None:
        return set()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys())
        except Exception:  # noqa: BLE001 - not a readable safetensors file: not an EAGLE head
            return set()
    return set(read_weights(directory))


def detect_format(directory: Path) -> str | None:
    """EAGLE1, EAGLE3 or None (not a public EAGLE head dir), from the tensor names alone."""
    if not (directory / "config.json").exists():
        return None
    names = tensor_names(directory)
    if any(name.startswith("midlayer.") for name in names):
        return EAGLE3
    if "fc.weight" in names and any(name.startswith("layers.0.") for name in names):
        return EAGLE1
    return None


def read_llama_config(directory: Path) -> LlamaConfig:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise EgptError(f"{directory / 'config.json'} is not readable JSON ({type(error).__name__}).") from None
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    if config.num_hidden_layers != 1:
        raise EgptError(f"EAGLE head {directory} has num_hidden_layers {config.num_hidden_layers}; only one-layer heads are supported.")
    config._attn_implementation = "sdpa"
    return config


def check_tensors(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path,
                  optional: tuple[str, ...] = ()) -> None:
    """One EgptError naming every missing or misshapen tensor of `expected` in `state`."""
    missing = [name for name in expected if name not in state and name not in optional]
    wrong = [f"{name} {tuple(state[name].shape)} (expected {shape})" for name, shape in expected.items()
             if name in state and tuple(state[name].shape) != shape]
    if missing or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"misshapen {', '.join(wrong)}"] if wrong else [])
        raise EgptError(f"EAGLE head {source} does not fit its config.json: {'; '.join(parts)}. "
                        "Use the head's own config.json and weights, unmodified.")


def layer_shapes(layer: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{name}": tuple(value.shape) for name, value in layer.state_dict().items()
            if not name.startswith(skip)}


# ------------------------------------------------------------------------------------------ EAGLE-1


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """fc.weight [H, 2H]: EAGLE-1 reads cat(embedding, feature), EagleHead cat(feature, embedding)."""
    hidden = weight.shape[0]
    return torch.cat([weight[:, hidden:], weight[:, :hidden]], dim=1)


def load_eagle1(directory: Path, device: torch.device, dtype: torch.dtype) -> EagleHead:
    config = read_llama_config(directory)
    head = EagleHead(config, input_norm=False)
    hidden = config.hidden_size
    expected = {"fc.weight": (hidden, 2 * hidden), "fc.bias": (hidden,), **layer_shapes(head.layer, "layers.0.")}
    state = read_weights(directory)
    check_tensors(state, expected, directory, optional=("fc.bias",))
    ours = {"fc.weight": swap_halves(state["fc.weight"]),
            "fc.bias": state.get("fc.bias", torch.zeros(hidden, dtype=state["fc.weight"].dtype))}
    ours.update({f"layer.{name[len('layers.0.'):]}": state[name] for name in expected if name.startswith("layers.0.")})
    head.load_state_dict(ours, strict=False)  # rotary tables are rebuilt, not stored
    return head.to(device=device, dtype=dtype).eval()


def export_eagle1(head: EagleHead, out: Path) -> list[str]:
    """Write `head` as an EAGLE-1 dir → notes on what the format cannot carry."""
    if isinstance(head, Eagle3Head):
        raise EgptError("this is an EAGLE-3 head (three fused target layers), which has no EAGLE-1 form; "
                        "export it with --format eagle3 (or --format auto).")
    if head.input_norm:
        raise EgptError("this head has an input norm, which EAGLE-1 loaders (vLLM llama_eagle.py, SGLang llama_eagle.py) "
                        "replace by the identity; train one with `train-draft --eagle1-layout`, or export an EAGLE-1 head.")
    state = {"fc.weight": swap_halves(head.fc.weight), "fc.bias": head.fc.bias}
    state.update({f"layers.0.{name}": value for name, value in head.layer.state_dict().items()})
    config = head.config.to_dict() | {"architectures": [EAGLE1_ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1}
    write_dir(out, config, state)
    notes = []
    if head.draft_vocab is not None:
        notes.append(f"EAGLE-1 drafts over all {head.config.vocab_size} ids: the head's {head.draft_vocab.numel()}-id "
                     "draft vocabulary is not part of the format")
    if bool(head.fc.bias.detach().abs().max() > 0):
        notes.append("vLLM's EAGLE-1 loader builds fc without a bias and skips fc.bias (SGLang keeps it)")
    return notes


# ------------------------------------------------------------------------------------------ EAGLE-3


class Eagle3Head(nn.Module):
    """EAGLE-3's draft layer, drivable by proposers.EagleProposer (same call signature as EagleHead).

    `features` are either the fused target states [B, T, 3H] (the three aux layers concatenated) or the
    head's own pre-norm outputs [B, T, H] fed back while drafting; the head's own norm and LM head
    give logits over its K-id draft vocabulary, `draft_vocab` [K] maps them to target ids.
    """

    def __init__(self, config: LlamaConfig, aux_layers: list[int], draft_vocab_size: int, target_hidden: int):
        super().__init__()
        self.config = config
        self.aux_layers = aux_layers
        hidden = config.hidden_size
        self.fc = nn.Linear(3 * target_hidden, hidden, bias=False)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        attention = self.layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):  # q/k/v read cat(embedding, hidden): 2H wide
            old = getattr(attention, name)
            setattr(attention, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
        self.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))
        self.register_buffer("draft_vocab", torch.arange(draft_vocab_size), persistent=False)  # [K] target ids

    def forward(self, features: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, T, 3H] or [B, T, H]; next_embeds [B, T, H]; positions [T] → pre-norm outputs [B, T, H]."""
        hidden = self.fc(features) if features.shape[-1] != self.config.hidden_size else features
        if mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            mask = causal_mask(hidden.shape[1], past, hidden.dtype, hidden.device)
        position_ids = positions.unsqueeze(0)
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        attention_in = torch.cat([self.layer.input_layernorm(next_embeds), normed], dim=-1)
        attended, _ = self.layer.self_attn(hidden_states=attention_in, attention_mask=mask, position_ids=position_ids,
                                           position_embeddings=self.rotary(hidden, position_ids), **{CACHE_KWARG: cache})
        hidden = residual + attended
        return hidden + self.layer.mlp(self.layer.post_attention_layernorm(hidden))

    def aux_layers_for(self, num_layers: int) -> list[int]:
        """The target layers whose inputs the head fuses: its config's, else vLLM's default (2, L//2, L-3)."""
        return list(self.aux_layers) or default_aux_layers(num_layers)

    def draft_logits(self, lm_head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """Logits [..., K] from the head's own norm and LM head (the target's `lm_head` is unused)."""
        return self.lm_head(self.norm(features))

    def token_ids(self, draft_indices: torch.Tensor) -> torch.Tensor:
        return self.draft_vocab[draft_indices]

    def draft_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Target ids → draft-vocabulary indices, -100 (cross_entropy's ignore_index) outside it."""
        lookup = torch.full((self.config.vocab_size,), -100, dtype=torch.long, device=self.draft_vocab.device)
        lookup[self.draft_vocab] = torch.arange(self.draft_vocab.numel(), device=self.draft_vocab.device)
        return lookup[token_ids]

    def position_loss(self, lm_head: nn.Module, prediction: torch.Tensor, target_features: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prediction [N, H], labels [N] target ids → (per-position loss [N], top-1 hits [N]).

        EAGLE-3 drops the feature regression (its outputs are no target layer's states): cross-entropy of its
        own draft-vocabulary logits only; `target_features` is unused."""
        logits = self.draft_logits(lm_head, prediction).float()
        loss = nn.functional.cross_entropy(logits, self.draft_indices(labels), reduction="none", ignore_index=-100)
        return loss, self.token_ids(logits.argmax(-1)) == labels

    def public_state(self) -> dict[str, torch.Tensor]:
        """Tensors under EAGLE-3's public names (d2t as offsets, t2d as a mask over target ids)."""
        state = {"fc.weight": self.fc.weight, "norm.weight": self.norm.weight, "lm_head.weight": self.lm_head.weight,
                 "midlayer.hidden_norm.weight": self.hidden_norm.weight}
        state.update({f"midlayer.{name}": value for name, value in self.layer.state_dict().items()})
        state["d2t"] = self.draft_vocab - torch.arange(self.draft_vocab.numel(), device=self.draft_vocab.device)
        t2d = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.draft_vocab.device)
        state["t2d"] = t2d.index_fill(0, self.draft_vocab, True)
        return state


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's aux layers when a head names none (models/llama.py get_eagle3_aux_hidden_state_layers)."""
    return [2, num_layers // 2, num_layers - 3]


def eagle3_settings(raw: dict, hidden: int, vocab: int) -> tuple[list[int], int, int]:
    """(aux layer ids, draft vocab size, target hidden size) from an EAGLE-3 config.json."""
    aux = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return list(aux) if aux else [], int(raw.get("draft_vocab_size") or vocab), int(raw.get("target_hidden_size") or hidden)


def load_eagle3(directory: Path, device: torch.device, dtype: torch.dtype) -> Eagle3Head:
    config = read_llama_config(directory)
    raw = json.loads((directory / "config.json").read_text())
    aux, draft_size, target_hidden = eagle3_settings(raw, config.hidden_size, config.vocab_size)
    head = Eagle3Head(config, aux, draft_size, target_hidden)
    expected = {name: tuple(value.shape) for name, value in head.public_state().items()}
    state = read_weights(directory)
    check_tensors(state, expected, directory, optional=("t2d", "d2t"))
    layer = {name[len("midlayer."):]: state[name] for name in expected
             if name.startswith("midlayer.") and name != "midlayer.hidden_norm.weight"}
    head.layer.load_state_dict(layer)
    with torch.no_grad():
        for name, parameter in (("fc.weight", head.fc.weight), ("norm.weight", head.norm.weight),
                                ("lm_head.weight", head.lm_head.weight), ("midlayer.hidden_norm.weight", head.hidden_norm.weight)):
            parameter.copy_(state[name])
        if "d2t" in state:
            head.draft_vocab.copy_(torch.arange(draft_size) + state["d2t"].long())
    if int(head.draft_vocab.max()) >= config.vocab_size:
        raise EgptError(f"EAGLE head {directory}: d2t maps draft ids beyond the vocabulary of {config.vocab_size} ids.")
    return head.to(device=device, dtype=dtype).eval()


def export_eagle3(head: nn.Module, out: Path) -> list[str]:
    if not isinstance(head, Eagle3Head):
        raise EgptError("an EAGLE-1-style head (fc over [feature; embedding], one Llama layer) has no exact EAGLE-3 "
                        "form (EAGLE-3 fuses three target layers and normalises the two inputs apart); "
                        "export it with --format eagle, or pass an EAGLE-3 head dir.")
    config = head.config.to_dict() | {
        "architectures": [EAGLE3_ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
        "tie_word_embeddings": False,  # SGLang would otherwise use the embedding table as the draft LM head
        "draft_vocab_size": head.lm_head.out_features, "target_hidden_size": head.fc.in_features // 3,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": head.aux_layers, "use_aux_hidden_state": True}}
    write_dir(out, config, head.public_state())
    return []


# ------------------------------------------------------------------------------------------ entry points


def write_dir(out: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))


def load_public_head(directory: Path, target_hidden: int, target_vocab: int, device: torch.device,
                     dtype: torch.dtype) -> EagleHead | Eagle3Head:
    """An EAGLE-1 or EAGLE-3 head dir, checked against the target's width and vocabulary."""
    kind = detect_format(directory)
    if kind is None:
        raise EgptError(f"{directory} is not an EAGLE-1 or EAGLE-3 head dir (no fc.weight + layers.0.* or midlayer.* tensors).")
    config = read_llama_config(directory)
    raw = json.loads((directory / "config.json").read_text())
    width = eagle3_settings(raw, config.hidden_size, config.vocab_size)[2] if kind == EAGLE3 else config.hidden_size
    if width != target_hidden or config.vocab_size != target_vocab:
        raise EgptError(f"EAGLE head {directory} was trained for a target of width {width} and {config.vocab_size} ids, "
                        f"but this target has width {target_hidden} and {target_vocab} ids; use a head made for it.")
    return (load_eagle3 if kind == EAGLE3 else load_eagle1)(directory, device, dtype)


def load_any_head(directory: Path, device: torch.device, dtype: torch.dtype) -> EagleHead | Eagle3Head:
    """Our head dir (train-draft) or a public EAGLE-1 / EAGLE-3 dir, for export-draft (no target needed)."""
    if is_head_dir(directory):
        read_head_meta(directory)
        return EagleHead.load(directory, device, dtype)
    kind = detect_format(directory)
    if kind is None:
        raise EgptError(f"{directory} is neither a train-draft head dir nor an EAGLE-1 / EAGLE-3 head dir.")
    return (load_eagle3 if kind == EAGLE3 else load_eagle1)(directory, device, dtype)


def export_head(head_dir: Path, fmt: str, out: Path) -> list[str]:
    """`egpt-speed export-draft`: write `head_dir` in `fmt`'s layout (auto: the head's own) under `out` → notes."""
    from egpt_speed.results import check_writable_dir

    if fmt not in (AUTO_FORMAT, *FORMATS):
        raise EgptError(f"--format {fmt!r} is not supported; use {AUTO_FORMAT}, {' or '.join(FORMATS)}.")
    if out.resolve() == head_dir.resolve():
        raise EgptError("--out must differ from the head dir: export writes config.json and model.safetensors there.")
    check_writable_dir(out)
    head = load_any_head(head_dir, torch.device("cpu"), torch.float32)
    if fmt == AUTO_FORMAT:
        fmt = EAGLE3 if isinstance(head, Eagle3Head) else EAGLE1
    return (export_eagle3 if fmt == EAGLE3 else export_eagle1)(head, out)
