"""An EAGLE-style draft head: one decoder layer over [target feature ; next token embedding].

It drafts through proposers.EagleProposer (chain or tree); this module is the head itself, its
files and the draft vocabulary.

The head predicts the target's next post-norm last hidden state ("feature"); the target's own LM
head turns it into a draft token, and the target's embedding table embeds tokens for it, so the
head owns only `fc` (2H → H) and one Llama decoder layer (Li et al., EAGLE, 2024).
Position t of the head sees (f_t, e_{t+1}) — the target's feature after input t and the embedding
of the input at t+1 (an event row inside the prefix, a token after it) — and predicts f_{t+1}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from egpt_speed.decoding import CACHE_KWARG
from egpt_speed.errors import EgptError
from egpt_speed.tree import additive_mask

HEAD_CONFIG = "eagle_config.json"
HEAD_WEIGHTS = "eagle_head.safetensors"
DRAFT_VOCAB_KEY = "draft_vocab"


def head_config_from_target(target_config) -> LlamaConfig:
    """A one-layer Llama config with the target's width, heads and RoPE."""
    config = LlamaConfig(**{k: v for k, v in target_config.to_dict().items() if k not in ("architectures", "model_type")})
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    config._attn_implementation = "sdpa"
    return config


class EagleHead(nn.Module):
    def __init__(self, config: LlamaConfig, input_norm: bool = True):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        # EAGLE-1's layer has no input norm (vLLM / SGLang replace it by the identity); ours may
        self.input_norm = input_norm
        if not input_norm:
            self.layer.input_layernorm = nn.Identity()
        self.rotary = LlamaRotaryEmbedding(config=config)
        # the token ids the head may draft (most frequent in the target's answers), None = all;
        # drafting over K ids makes each draft step's LM-head product V/K times cheaper (FR-Spec)
        self.draft_vocab: torch.Tensor | None = None
        self._draft_rows: tuple[int, torch.Tensor] | None = None  # (LM-head weight id, its draft-vocab rows)

    def forward(self, features: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """features, next_embeds: [B, T, H]; positions: [T] absolute → predicted next features [B, T, H].

        mask: an additive [1, 1, T, past + T] mask (a draft tree's); causal when None.
        """
        hidden = self.fc(torch.cat([features, next_embeds], dim=-1))
        position_ids = positions.unsqueeze(0)
        if mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            mask = causal_mask(hidden.shape[1], past, hidden.dtype, hidden.device)
        output = self.layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=cache is not None,
                            position_embeddings=self.rotary(hidden, position_ids), **{CACHE_KWARG: cache})
        return output[0] if isinstance(output, tuple) else output

    def save(self, directory: Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        # bf16 on disk: a few MB for a small target; the run dtype is applied on load
        state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith("rotary.")}
        if self.draft_vocab is not None:
            state[DRAFT_VOCAB_KEY] = self.draft_vocab.to(torch.int32).contiguous().cpu()
        save_file(state, str(directory / HEAD_WEIGHTS))
        (directory / HEAD_CONFIG).write_text(json.dumps({"kind": "eagle", "input_norm": self.input_norm, "llama_config": self.config.to_dict(), **(extra or {})},
                                                        indent=1, default=str))

    @classmethod
    def load(cls, directory: Path, device: torch.device, dtype: torch.dtype) -> "EagleHead":
        from safetensors.torch import load_file

        meta = read_head_meta(directory)
        config = LlamaConfig(**{k: v for k, v in meta["llama_config"].items() if k not in ("architectures", "model_type")})
        config._attn_implementation = "sdpa"
        head = cls(config, input_norm=meta.get("input_norm", True))
        try:
            state = load_file(str(directory / HEAD_WEIGHTS))
            vocab = state.pop(DRAFT_VOCAB_KEY, None)
            missing, unexpected = head.load_state_dict(state, strict=False)
        except Exception as error:  # safetensors raises several types for damaged files
            raise EgptError(f"draft head {directory / HEAD_WEIGHTS} could not be read ({type(error).__name__}); retrain it with train-draft.") from None
        missing = [key for key in missing if not key.startswith("rotary.")]  # RoPE tables are rebuilt, not stored
        if missing or unexpected:
            raise EgptError(f"draft head {directory / HEAD_WEIGHTS} does not match its config "
                            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); retrain it with train-draft.")
        head = head.to(device=device, dtype=dtype).eval()
        head.draft_vocab = vocab.to(device=device, dtype=torch.long) if vocab is not None else None
        return head

    def aux_layers_for(self, num_layers: int) -> None:
        """None: the head reads the target's final-norm last layer (EAGLE-3 heads name three layers)."""
        return None

    def draft_logits(self, lm_head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
        """Logits [..., K] over the draft vocabulary (all V ids when there is none)."""
        if self.draft_vocab is None:
            return lm_head(features)
        if self._draft_rows is None or self._draft_rows[0] != id(lm_head.weight):
            self._draft_rows = (id(lm_head.weight), lm_head.weight[self.draft_vocab].detach())
        return torch.nn.functional.linear(features, self._draft_rows[1].to(features.dtype))

    def token_ids(self, draft_indices: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices → token ids."""
        return draft_indices if self.draft_vocab is None else self.draft_vocab[draft_indices]

    def position_loss(self, lm_head: nn.Linear, prediction: torch.Tensor, target_features: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prediction, target_features [N, H], labels [N] → (per-position loss [N], top-1 hits [N]): EAGLE's
        SmoothL1 on the feature + 0.1 × cross-entropy of the target's LM head against the target's token."""
        logits = lm_head(prediction).float()
        feature_loss = nn.functional.smooth_l1_loss(prediction.float(), target_features, reduction="none").mean(-1)
        return feature_loss + 0.1 * nn.functional.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1) == labels


def draft_vocabulary(label_sequences: list[torch.Tensor], size: int, always: list[int]) -> torch.Tensor:
    """The `size` token ids the target emits most often in `label_sequences` (+ `always`, e.g. EOS), sorted."""
    counts = torch.bincount(torch.cat([labels.flatten().long() for labels in label_sequences]))
    ranked = counts.argsort(descending=True)[:size].tolist()
    kept = [token for token in ranked if counts[token] > 0]
    return torch.tensor(sorted(set(kept) | set(always)), dtype=torch.long)


def read_head_meta(directory: Path) -> dict:
    path = directory / HEAD_CONFIG
    if not path.exists():
        raise EgptError(f"{directory} is not a draft head dir (no {HEAD_CONFIG}); create one with `egpt-speed train-draft`.")
    return json.loads(path.read_text())


def is_head_dir(directory: Path) -> bool:
    return (directory / HEAD_CONFIG).exists()


def causal_mask(query_len: int, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, q, past + q] additive mask: query i may attend keys j ≤ past + i (SDPA's is_causal aligns
    top-left, which is wrong once a cache holds earlier keys)."""
    keys = torch.arange(past_len + query_len, device=device)  # built on the device: no copy per draft step
    queries = torch.arange(query_len, device=device).unsqueeze(1) + past_len
    return additive_mask(keys.unsqueeze(0) <= queries, dtype, device)
