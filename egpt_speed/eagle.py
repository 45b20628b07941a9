"""An EAGLE-style draft head: one decoder layer over [target feature ; next token embedding].

The head predicts the target's next post-norm last hidden state ("feature"); the target's own LM
head turns it into a draft token, and the target's embedding table embeds tokens for it, so the
head owns only `fc` (2H → H) and one Llama decoder layer (Li et al., EAGLE, 2024).
Position t of the head sees (f_t, e_{t+1}) — the target's feature after input t and the embedding
of the input at t+1 (an event row inside the prefix, a token after it) — and predicts f_{t+1}.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from egpt_speed.decoding import GenerationSettings, crop_cache, draft_token, sampling_probs
from egpt_speed.errors import EgptError
from egpt_speed.tree import DraftTree, additive_mask

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
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
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
        output = self.layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                            use_cache=cache is not None, position_embeddings=self.rotary(hidden, position_ids))
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
        (directory / HEAD_CONFIG).write_text(json.dumps({"kind": "eagle", "llama_config": self.config.to_dict(), **(extra or {})},
                                                        indent=1, default=str))

    @classmethod
    def load(cls, directory: Path, device: torch.device, dtype: torch.dtype) -> "EagleHead":
        from safetensors.torch import load_file

        meta = read_head_meta(directory)
        config = LlamaConfig(**{k: v for k, v in meta["llama_config"].items() if k not in ("architectures", "model_type")})
        config._attn_implementation = "sdpa"
        head = cls(config)
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


def sampling_branching(depth: int, expanded_per_level: int, max_nodes: int) -> int:
    """Children per node for a sampled tree: the widest b whose full tree (b children at the root, then
    up to `expanded_per_level` nodes per level with b children each, `depth` levels) has ≤ max_nodes nodes."""
    for width in range(max(expanded_per_level, 1), 0, -1):
        level, total = width, width
        for _ in range(depth - 1):
            level = min(expanded_per_level, level) * width
            total += level
        if total <= max_nodes:
            return width
    return 1


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


class EagleProposer:
    """Chain drafting with an EAGLE head from the target's features (greedy or sampled)."""

    wants_hidden = True

    def __init__(self, head: EagleHead, target_llm, prefix_embeds: torch.Tensor):
        self.head = head
        self.embed = target_llm.get_input_embeddings()
        self.lm_head = target_llm.lm_head
        self.prefix_embeds = prefix_embeds  # [1, L, H] the spliced prompt (event rows included)
        self.prefix_len = prefix_embeds.shape[1]
        self.features: list[torch.Tensor] = []  # target features not yet fed to the head, [1, T_i, H] chunks
        self.observed = 0  # target positions with a known feature
        self.consumed = 0  # positions already in the head's cache
        self.cache = DynamicCache(config=head.config)

    def start(self) -> None:
        pass

    def observe(self, hidden: torch.Tensor) -> None:
        self.features.append(hidden)
        self.observed += hidden.shape[1]

    def _next_embeds(self, start: int, stop: int, committed: list[int]) -> torch.Tensor:
        """Embeddings of the inputs at positions start+1 .. stop (prefix rows, then committed tokens)."""
        rows = []
        prefix_part = self.prefix_embeds[:, start + 1:min(stop + 1, self.prefix_len)]
        if prefix_part.shape[1]:
            rows.append(prefix_part)
        first_token = max(start + 1, self.prefix_len) - self.prefix_len
        last_token = stop + 1 - self.prefix_len
        if last_token > first_token:
            ids = torch.tensor(committed[first_token:last_token], device=self.prefix_embeds.device)
            rows.append(self.embed(ids).unsqueeze(0))
        return torch.cat(rows, dim=1)

    def _catch_up(self, committed: list[int]) -> torch.Tensor:
        """Feed the head the target features it has not seen → f̂ [1, 1, H] for position `observed`."""
        fresh = torch.cat(self.features, dim=1) if len(self.features) > 1 else self.features[0]
        self.features = []  # only features the head has not read are kept: no growing copies
        assert fresh.shape[1] == self.observed - self.consumed, (fresh.shape, self.observed, self.consumed)
        next_embeds = self._next_embeds(self.consumed, self.observed, committed).to(fresh.dtype)
        positions = torch.arange(self.consumed, self.observed, device=fresh.device)
        predicted = self.head(fresh, next_embeds, positions, self.cache)[:, -1:]
        self.consumed = self.observed
        return predicted

    def propose(self, committed, gamma, settings, generator):
        predicted = self._catch_up(committed)
        tokens, probs = [], []
        position = self.observed
        for step in range(gamma):
            token, p = self._draft_token(predicted[0, -1], settings, generator)
            tokens.append(token)
            if p is not None:
                probs.append(p)
            if step + 1 < gamma:
                predicted = self.head(predicted, self.embed(token).unsqueeze(0).to(predicted.dtype),
                                      torch.tensor([position], device=token.device), self.cache)
                position += 1
        return torch.cat(tokens), (torch.stack(probs) if probs else None)

    def propose_tree(self, committed: list[int], depth: int, topk: int, max_nodes: int,
                     settings: GenerationSettings | None = None, generator: torch.Generator | None = None) -> DraftTree:
        """EAGLE-2's dynamic tree: expand the `topk` most likely candidates per level (by the
        product of draft probabilities along their path) for `depth` levels, then keep the
        `max_nodes` most likely candidates overall. One head forward per level, the level's nodes
        batched under a tree mask over the head's cache.

        Greedy: each expanded node's children are its `topk` likeliest tokens. Sampling: they are
        `topk` draws without replacement from the draft distribution (kept in the tree as
        `child_probs`, in draw order), which tree rejection sampling needs to stay lossless."""
        sampling = settings is not None and settings.do_sample
        # sampling keeps every drawn child: trimming children by their own drawn values would bias
        # tree rejection sampling, so the width per node is fixed up front to fit max_nodes
        width = sampling_branching(depth, topk, max_nodes) if sampling else topk
        predicted = self._catch_up(committed)  # [1, 1, H]
        base = self.consumed  # head-cache length before the tree
        indices, log_q, q_full = self._children(predicted[0], width, settings if sampling else None, generator)
        pool_tokens: list[int] = self.head.token_ids(indices[0]).tolist()
        pool_scores: list[float] = log_q[0].tolist()
        pool_parents: list[int] = [-1] * len(pool_tokens)  # pool index of the parent, -1 = root
        child_probs = {-1: q_full[0]} if sampling else {}  # pool index of an expanded node → its children's q
        frontier = list(range(len(pool_tokens)))  # candidates expanded at the next level
        frontier_features = predicted.expand(1, len(frontier), predicted.shape[-1])
        slots: dict[int, int] = {}  # pool index → head-cache slot of an expanded candidate
        for level in range(1, depth):
            for index in frontier:
                slots[index] = len(slots)
            mask = self._tree_mask(frontier, pool_parents, slots, base, predicted.dtype, predicted.device)
            tokens = torch.tensor([pool_tokens[i] for i in frontier], device=predicted.device)
            positions = torch.full((len(frontier),), self.observed + level - 1, device=predicted.device)
            out = self.head(frontier_features, self.embed(tokens).unsqueeze(0).to(predicted.dtype), positions,
                            self.cache, mask)  # [1, m, H]
            indices, log_q, q_full = self._children(out[0], width, settings if sampling else None, generator)  # [m, k]
            parent_scores = torch.tensor([pool_scores[i] for i in frontier], device=log_q.device)
            scores = (parent_scores[:, None] + log_q).flatten()  # [m * k]
            first = len(pool_tokens)
            pool_tokens += self.head.token_ids(indices.flatten()).tolist()
            pool_scores += scores.tolist()
            pool_parents += [frontier[row] for row in range(len(frontier)) for _ in range(indices.shape[1])]
            if sampling:
                child_probs.update({node: q_full[row] for row, node in enumerate(frontier)})
            chosen = scores.topk(min(topk, scores.numel())).indices
            frontier = [first + i for i in chosen.tolist()]
            frontier_features = out[:, chosen // indices.shape[1]]
        return self._select(committed[-1], pool_tokens, pool_scores, pool_parents,
                            len(pool_tokens) if sampling else max_nodes, child_probs)

    def _children(self, features: torch.Tensor, count: int, settings: GenerationSettings | None,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """features [m, H] → per row: draft-vocabulary indices of `count` children [m, k] (likeliest first,
        or in draw order when sampling), their log-probabilities [m, k], and when sampling the
        distribution they were drawn from over all ids [m, V]."""
        logits = self.head.draft_logits(self.lm_head, features).float()  # [m, K]
        if settings is None:
            top = torch.log_softmax(logits, dim=-1).topk(min(count, logits.shape[-1]), dim=-1)
            return top.indices, top.values, None
        q = sampling_probs(logits, settings)  # [m, K]
        count = min(count, int((q > 0).sum(-1).min()))  # without replacement: no more draws than tokens with mass
        indices = torch.multinomial(q, count, replacement=False, generator=generator)
        q_full = q if self.head.draft_vocab is None else torch.zeros(
            q.shape[0], self.lm_head.weight.shape[0], dtype=q.dtype, device=q.device).index_copy(1, self.head.draft_vocab, q)
        return indices, q.gather(-1, indices).log(), q_full

    def _draft_token(self, feature: torch.Tensor, settings: GenerationSettings,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """feature [H] → (token [1], p_draft [V] when sampling: the draft distribution scattered to all ids)."""
        index, p = draft_token(self.head.draft_logits(self.lm_head, feature), settings, generator)
        token = self.head.token_ids(index)
        if p is None or self.head.draft_vocab is None:
            return token, p
        full = torch.zeros(self.lm_head.weight.shape[0], dtype=p.dtype, device=p.device)
        return token, full.index_copy(0, self.head.draft_vocab, p)

    @staticmethod
    def _tree_mask(frontier: list[int], parents: list[int], slots: dict[int, int], base: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[1, 1, m, base + slots] additive: a frontier node sees the head's cache, its ancestors' slots and its own."""
        allowed = torch.zeros(len(frontier), base + len(slots), dtype=torch.bool)
        allowed[:, :base] = True
        for row, node in enumerate(frontier):
            while node != -1:
                allowed[row, base + slots[node]] = True
                node = parents[node]
        return additive_mask(allowed, dtype, device)

    @staticmethod
    def _select(root_token: int, tokens: list[int], scores: list[float], parents: list[int], max_nodes: int,
                child_probs: dict[int, torch.Tensor] | None = None) -> DraftTree:
        """The `max_nodes` best candidates, best first, taking a candidate only once its parent and its
        earlier siblings are taken: the tree is ancestor-closed and each node keeps a prefix of its
        children in draw order (what tree rejection sampling assumes); nodes are ordered parents first."""
        previous_sibling, last_child = [-1] * len(tokens), {}
        for index, parent in enumerate(parents):
            previous_sibling[index] = last_child.get(parent, -1)
            last_child[parent] = index
        waiting: dict[int, list[int]] = {}  # a candidate's blocker (parent or earlier sibling) → candidates
        ready: list[tuple[float, int]] = []
        for index in range(len(tokens)):
            blockers = [b for b in (parents[index], previous_sibling[index]) if b != -1]
            if blockers:
                waiting.setdefault(max(blockers), []).append(index)  # the later blocker is taken last
            else:
                heapq.heappush(ready, (-scores[index], index))
        kept: set[int] = set()
        while ready and len(kept) < max_nodes:
            _, index = heapq.heappop(ready)
            kept.add(index)
            for candidate in waiting.pop(index, []):
                if all(b == -1 or b in kept for b in (parents[candidate], previous_sibling[candidate])):
                    heapq.heappush(ready, (-scores[candidate], candidate))
                else:
                    waiting.setdefault(next(b for b in (parents[candidate], previous_sibling[candidate])
                                            if b != -1 and b not in kept), []).append(candidate)
        node_of = {-1: 0}
        tree_tokens, tree_parents = [root_token], [-1]
        for index in sorted(kept):  # pool order lists parents and earlier siblings first
            node_of[index] = len(tree_tokens)
            tree_tokens.append(tokens[index])
            tree_parents.append(node_of[parents[index]])
        probs = {node_of[index]: q for index, q in (child_probs or {}).items() if index in node_of}
        return DraftTree(tree_tokens, tree_parents, probs or None)

    def rollback(self, committed) -> None:
        # drafted positions used predicted features; the target's real ones replace them next time
        crop_cache(self.cache, self.consumed)
