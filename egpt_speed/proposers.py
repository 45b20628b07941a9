"""Proposers: what drafts tokens for the speculative loop (speculation.py) to verify (verify.py).

A proposer drafts up to γ tokens after the committed ones (`propose`), optionally reads the target's
hidden states of the positions it verified (`observe`) and forgets rejected drafts (`rollback`).
The causal-LM proposer runs any draft model on its own KV cache, the prompt-lookup proposer copies
n-gram continuations, the EAGLE proposer drafts a chain or a tree from the target's features.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from egpt_speed.decoding import GenerationSettings, crop_cache, draft_token, sampling_probs, with_cache
from egpt_speed.errors import EgptError
from egpt_speed.tree import DraftTree, pool_tree_mask, sampling_branching, select_tree
from egpt_speed.verify import ChainDraft


class Proposer:
    """A drafter. `start`, `observe` and `rollback` do nothing unless a drafter needs them."""

    def start(self) -> None:
        """Prefill whatever the drafter conditions on (called once, after the target's prefill)."""

    def observe(self, hidden: torch.Tensor) -> None:
        """hidden: [1, q, H] the target's final-norm hidden states of the q positions it just committed
        (the whole prefix after prefill; the pending token + accepted drafts after each verify)."""

    def propose(self, committed: list[int], gamma: int, settings: GenerationSettings,
                generator: torch.Generator | None) -> ChainDraft:
        """Up to γ draft tokens after `committed` (its last token pending: the target has not read it)."""
        raise NotImplementedError

    def rollback(self, committed: list[int]) -> None:
        """`committed` is final (its last token pending); forget anything drafted beyond it."""


class CausalLMProposer(Proposer):
    """Drafts with any causal LM on its own KV cache.

    The draft conditions on `prefix_ids` (a text-only draft: the prompt without the event
    placeholder) or on `prefix_embeds` (a multimodal draft's spliced prompt: the target's own, or a
    cross-modal draft's, built from its own view of the sample). With `token_map`
    (cross_modal.TokenMap) the draft reads the target's tokens as its own ids and drafts only ids
    both tokenizers share; its proposals are over the target's vocabulary.
    """

    def __init__(self, llm, prefix_ids: torch.Tensor | None = None, prefix_embeds: torch.Tensor | None = None,
                 token_map=None):
        assert (prefix_ids is None) != (prefix_embeds is None), "give the draft ids or embeddings"
        self.llm = llm
        self.token_map = token_map
        self.prefix_ids = prefix_ids  # [L_text]
        self.prefix_embeds = prefix_embeds  # [1, L, H]
        self.device = llm.get_input_embeddings().weight.device
        self.cache = DynamicCache(config=llm.config)
        self.prefix_len = 0
        self.consumed = 0  # committed tokens already in the draft cache
        self._in_cache: list[int] = []  # draft tokens fed to the cache beyond `consumed`

    def start(self) -> None:
        if self.prefix_embeds is not None:
            self.llm(**with_cache(self.cache, inputs_embeds=self.prefix_embeds.to(self.llm.dtype)))
            self.prefix_len = self.prefix_embeds.shape[1]
        else:
            self.llm(**with_cache(self.cache, input_ids=self.prefix_ids.to(self.device).unsqueeze(0)))
            self.prefix_len = self.prefix_ids.shape[0]

    def _next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [1, n] target ids → the draft's logits [V] after the last of them (over the target's ids)."""
        if self.token_map is None:
            return self.llm(**with_cache(self.cache, input_ids=ids, logits_to_keep=1)).logits[0, -1]
        logits = self.llm(**with_cache(self.cache, input_ids=self.token_map.draft_ids(ids), logits_to_keep=1)).logits
        return self.token_map.target_logits(logits[0, -1])

    def propose(self, committed, gamma, settings, generator) -> ChainDraft:
        if gamma == 0:
            return ChainDraft.empty(self.device)
        # feed the committed tokens the draft has not seen yet (at least the pending one)
        logits = self._next_logits(torch.tensor(committed[self.consumed:], device=self.device).unsqueeze(0))
        self.consumed = len(committed)
        tokens, probs = [], []
        for step in range(gamma):
            token, p = draft_token(logits, settings, generator)
            tokens.append(token)
            if p is not None:
                probs.append(p)
            if step + 1 < gamma:
                logits = self._next_logits(token.unsqueeze(0))
        draft = torch.cat(tokens)
        self._in_cache = draft[:-1].tolist()  # the last draft token was never fed
        return ChainDraft(draft, torch.stack(probs) if probs else None)

    def rollback(self, committed: list[int]) -> None:
        # the cache holds prefix + committed[:consumed] + d_1..d_{k-1}; keep the drafted tokens
        # that were accepted (they equal the committed ones), never the pending last token
        final = committed[self.consumed:-1]
        matched = 0
        for drafted, kept in zip(self._in_cache, final):
            if drafted != kept:
                break
            matched += 1
        self.consumed += matched
        crop_cache(self.cache, self.prefix_len + self.consumed)
        self._in_cache = []


class PromptLookupProposer(Proposer):
    """Prompt lookup decoding: propose the γ tokens that followed the most recent earlier occurrence
    of the current suffix n-gram (longest n first) in the text prompt + the tokens generated so far."""

    def __init__(self, context_ids: list[int], vocab_size: int, device: torch.device, max_ngram: int):
        self.context = context_ids  # the text prompt (event placeholder removed)
        self.vocab_size = vocab_size
        self.device = device
        self.max_ngram = max_ngram

    def propose(self, committed, gamma, settings, generator) -> ChainDraft:
        history = self.context + committed
        found: list[int] = []
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            suffix = history[-n:]
            # most recent earlier occurrence whose continuation exists
            for start in range(len(history) - n - 1, -1, -1):
                if history[start:start + n] == suffix:
                    found = history[start + n:start + n + gamma]
                    break
            if found:
                break
        tokens = torch.tensor(found, dtype=torch.long, device=self.device)
        if settings.do_sample and found:
            # a deterministic proposal is the one-hot distribution; rejection sampling stays exact
            return ChainDraft(tokens, torch.nn.functional.one_hot(tokens, self.vocab_size).float())
        return ChainDraft(tokens)


class EagleProposer(Proposer):
    """Chain or tree drafting with an EAGLE head (eagle.EagleHead) from the target's features.

    Position t of the head reads (target feature f_t, embedding of the input at t+1) and predicts
    f_{t+1}; the target's LM head turns a predicted feature into draft logits. An EAGLE-3 head
    (eagle_formats.Eagle3Head) reads instead the inputs of three target layers, `aux_layers`, which
    the target must pass (DynamicTarget.capture_layers), and drafts with its own norm and LM head.
    """

    def __init__(self, head, target_llm, prefix_embeds: torch.Tensor):
        self.head = head
        self.aux_layers: list[int] | None = head.aux_layers_for(len(target_llm.model.layers))
        self.embed = target_llm.get_input_embeddings()
        self.lm_head = target_llm.lm_head
        self.prefix_embeds = prefix_embeds  # [1, L, H] the spliced prompt (event rows included)
        self.prefix_len = prefix_embeds.shape[1]
        self.features: list[torch.Tensor] = []  # target features not yet fed to the head, [1, T_i, H] chunks
        self.observed = 0  # target positions with a known feature
        self.consumed = 0  # positions already in the head's cache
        self.cache = DynamicCache(config=head.config)

    def observe(self, hidden: torch.Tensor) -> None:
        if self.aux_layers and hidden.shape[-1] != len(self.aux_layers) * self.prefix_embeds.shape[-1]:
            raise EgptError(f"this EAGLE-3 head reads target layers {self.aux_layers}, but the target passed only its last "
                            "layer; verify on a DynamicTarget with capture_layers (not a compiled target).")
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

    def propose(self, committed, gamma, settings, generator) -> ChainDraft:
        if gamma == 0:
            return ChainDraft.empty(self.prefix_embeds.device)
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
        return ChainDraft(torch.cat(tokens), torch.stack(probs) if probs else None)

    def propose_tree(self, committed: list[int], depth: int, topk: int, max_nodes: int,
                     settings: GenerationSettings, generator: torch.Generator | None) -> DraftTree:
        """EAGLE-2's dynamic tree: expand the `topk` most likely candidates per level (by the
        product of draft probabilities along their path) for `depth` levels, then keep the
        `max_nodes` most likely candidates overall. One head forward per level, the level's nodes
        batched under a tree mask over the head's cache.

        Greedy: each expanded node's children are its `topk` likeliest tokens. Sampling: they are
        draws without replacement from the draft distribution (kept in the tree as `child_probs`,
        in draw order), which tree rejection sampling needs to stay lossless."""
        if depth == 0:
            return DraftTree([committed[-1]], [-1])
        sampling = settings.do_sample
        # sampling keeps every drawn child: trimming children by their own drawn values would bias
        # tree rejection sampling, so the width per node is fixed up front to fit max_nodes
        width = sampling_branching(depth, topk, max_nodes) if sampling else topk
        predicted = self._catch_up(committed)  # [1, 1, H]
        base = self.consumed  # head-cache length before the tree
        indices, log_q, q_full = self._children(predicted[0], width, settings, generator)
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
            mask = pool_tree_mask(frontier, pool_parents, slots, base, predicted.dtype, predicted.device)
            tokens = torch.tensor([pool_tokens[i] for i in frontier], device=predicted.device)
            positions = torch.full((len(frontier),), self.observed + level - 1, device=predicted.device)
            out = self.head(frontier_features, self.embed(tokens).unsqueeze(0).to(predicted.dtype), positions,
                            self.cache, mask)  # [1, m, H]
            indices, log_q, q_full = self._children(out[0], width, settings, generator)  # [m, k]
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
        return select_tree(committed[-1], pool_tokens, pool_scores, pool_parents,
                           len(pool_tokens) if sampling else max_nodes, child_probs)

    def _children(self, features: torch.Tensor, count: int, settings: GenerationSettings,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """features [m, H] → per row: draft-vocabulary indices of `count` children [m, k] (likeliest first,
        or in draw order when sampling), their log-probabilities [m, k], and when sampling the
        distribution they were drawn from over all ids [m, V]."""
        logits = self.head.draft_logits(self.lm_head, features).float()  # [m, K]
        if not settings.do_sample:
            top = torch.log_softmax(logits, dim=-1).topk(min(count, logits.shape[-1]), dim=-1)
            return top.indices, top.values, None
        q = sampling_probs(logits, settings)  # [m, K]
        count = min(count, int((q > 0).sum(-1).min()))  # without replacement: no more draws than tokens with mass
        indices = torch.multinomial(q, count, replacement=False, generator=generator)
        return indices, q.gather(-1, indices).log(), self._full_vocab(q)

    def _full_vocab(self, q: torch.Tensor) -> torch.Tensor:
        """q: [..., K] over the head's draft vocabulary → [..., V] over all ids (zero elsewhere)."""
        if self.head.draft_vocab is None:
            return q
        full = torch.zeros(*q.shape[:-1], self.lm_head.weight.shape[0], dtype=q.dtype, device=q.device)
        return full.index_copy(-1, self.head.draft_vocab, q)

    def _draft_token(self, feature: torch.Tensor, settings: GenerationSettings,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """feature [H] → (token [1], p_draft [V] when sampling: the draft distribution scattered to all ids)."""
        index, p = draft_token(self.head.draft_logits(self.lm_head, feature), settings, generator)
        return self.head.token_ids(index), (None if p is None else self._full_vocab(p))

    def rollback(self, committed) -> None:
        # drafted positions used predicted features; the target's real ones replace them next time
        crop_cache(self.cache, self.consumed)
