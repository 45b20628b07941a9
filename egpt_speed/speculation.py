"""Verification of drafted tokens, shared by every speculative strategy.

Names follow Leviathan et al. (2023): ``p_target`` is the target model's distribution (their p),
``p_draft`` the draft's (their q). Per step the draft proposes γ tokens d_1..d_γ; the target scores
[last token, d_1..d_γ] in one forward, giving γ+1 next-token distributions. *Accepted* tokens are
the draft tokens kept; the *bonus* token is the one the target adds after them (a correction
where a draft token was rejected, or a free extra token when all γ were accepted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from egpt_speed.decoding import DecodeResult, GenerationSettings, crop_cache, draft_token, make_generator, sampling_probs
from egpt_speed.timing import Clock
from egpt_speed.tree import (DraftTree, greedy_tree_accept, keep_cache_positions, sample_tree_accept, tree_attention_mask,
                             tree_position_ids)


def greedy_accept(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of the draft equal to the target's greedy choices, plus the bonus token.

    draft_tokens: [γ] ; target_argmax: [γ+1] (target's argmax after each of last, d_1..d_γ).
    Returns (accepted count n, bonus token = target_argmax[n]). One host sync.
    """
    gamma = draft_tokens.shape[0]
    mismatch = (draft_tokens != target_argmax[:gamma]).int()
    # index of the first mismatch, γ when none: cumsum is 0 exactly on the matching prefix
    accepted = int((mismatch.cumsum(0) == 0).sum().item())
    return accepted, int(target_argmax[accepted].item())


def rejection_sample(draft_tokens: torch.Tensor, p_draft: torch.Tensor, p_target: torch.Tensor,
                     generator: torch.Generator) -> tuple[int, int]:
    """Speculative sampling: the output is distributed exactly as sampling from p_target.

    draft_tokens: [γ] ; p_draft: [γ, V] (the draft's distribution each d_i was drawn from) ;
    p_target: [γ+1, V]. Accept d_i with probability min(1, p_target(d_i) / p_draft(d_i)); at the
    first rejection draw the bonus from norm(max(0, p_target − p_draft)); if all are accepted draw
    it from p_target[γ]. Returns (accepted count n, bonus token).
    """
    gamma = draft_tokens.shape[0]
    positions = torch.arange(gamma, device=draft_tokens.device)
    p_t = p_target[positions, draft_tokens]
    p_d = p_draft[positions, draft_tokens]
    uniform = torch.rand(gamma, device=draft_tokens.device, generator=generator)
    rejected = uniform * p_d > p_t  # u > p_t/p_d without dividing by a zero p_d
    accepted = int(rejected.int().argmax().item()) if bool(rejected.any()) else gamma
    if accepted < gamma:
        residual = (p_target[accepted] - p_draft[accepted]).clamp_min(0.0)
        total = residual.sum()
        distribution = residual / total if total > 0 else p_target[accepted]
    else:
        distribution = p_target[gamma]
    bonus = int(torch.multinomial(distribution, 1, generator=generator).item())
    return accepted, bonus


# ----------------------------------------------------------------------------------------------
# The draft–verify loop (hand-written: transformers' assisted generation cannot take a multimodal
# `inputs_embeds` prefix for the target while a draft of another width sees only the text, and
# it is batch-1 greedy/sampling only without per-position counters).
# ----------------------------------------------------------------------------------------------

class Proposer(Protocol):
    """A drafter: proposes up to γ tokens after the committed ones and follows rollbacks."""

    def start(self) -> None:
        """Prefill whatever the drafter conditions on (called once, after the target's prefill)."""

    def propose(self, committed: list[int], gamma: int, settings: GenerationSettings,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ (draft tokens [k ≤ γ], p_draft [k, V] when sampling else None). k may be 0."""

    def rollback(self, committed: list[int]) -> None:
        """`committed` is final (its last token pending); forget anything drafted beyond it."""


@dataclass
class SpeculationCounters:
    gamma: int
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    tree_nodes: int = 0  # drafted tree nodes verified (tree drafting only)

    def record(self, proposed: int, accepted: int) -> None:
        width = max(len(self.drafted_by_position), proposed)
        self.drafted_by_position += [0] * (width - len(self.drafted_by_position))
        self.accepted_by_position += [0] * (width - len(self.accepted_by_position))
        for position in range(proposed):
            self.drafted_by_position[position] += 1
            self.accepted_by_position[position] += int(position < accepted)
        self.drafted += proposed
        self.accepted += accepted


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """logits: [V] → the next token (argmax, or a draw from the tempered/top-p distribution)."""
    if not settings.do_sample:
        return int(logits.argmax().item())
    return int(torch.multinomial(sampling_probs(logits, settings), 1, generator=generator).item())


def target_forward(target_llm, cache, last_only: bool = False, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One target forward returning (logits [T, V], post-norm last hidden states [1, T, H]).

    The hidden states are what an EAGLE-style head drafts from; `last_only` keeps the LM head to
    the final position (prefill), as generate does.
    """
    hidden = target_llm.model(past_key_values=cache, use_cache=True, **inputs).last_hidden_state
    logits = target_llm.lm_head(hidden[:, -1:] if last_only else hidden)
    return logits[0], hidden


class Target(Protocol):
    """The verifying model and its KV cache: DynamicTarget (default) or static_decode.StaticTarget.

    After prefill/verify, `last_hidden` [1, q, H] holds the final-norm hidden states of those q
    positions (what an EAGLE-style drafter reads).
    """

    last_hidden: torch.Tensor | None

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds: [1, L, H] → logits [V] after the last prompt position; the cache holds the prompt."""

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [1, k+1] (pending, d_1..d_k) → logits [k+1, V]; their keys/values join the cache."""

    def crop(self, length: int) -> None:
        """Keep the first `length` cached positions."""


class DynamicTarget:
    """The target on transformers' DynamicCache (crop slices the cache tensors)."""

    def __init__(self, llm):
        self.llm = llm
        self.cache = DynamicCache(config=llm.config)
        self.last_hidden: torch.Tensor | None = None
        self._tree_base = 0  # cache length before the last verify_tree

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        logits, self.last_hidden = target_forward(self.llm, self.cache, last_only=True, inputs_embeds=embeds)
        return logits[-1]

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.last_hidden = target_forward(self.llm, self.cache, input_ids=tokens)
        return logits

    def crop(self, length: int) -> None:
        crop_cache(self.cache, length)

    def verify_tree(self, tree: DraftTree) -> torch.Tensor:
        """All N+1 tree nodes in one forward under the tree mask → logits [N+1, V]; the cache then
        holds every node until `keep_path`."""
        base = self.cache.get_seq_length()
        device = self.llm.lm_head.weight.device
        inputs = torch.tensor(tree.tokens, device=device).unsqueeze(0)
        mask = tree_attention_mask(tree, base, self.llm.dtype, device)
        logits, self.last_hidden = target_forward(self.llm, self.cache, input_ids=inputs, attention_mask=mask,
                                                  position_ids=tree_position_ids(tree, base, device))
        self._tree_base = base
        return logits

    def keep_path(self, keep: list[int]) -> None:
        """After verify_tree: keep the root and the accepted path (block offsets) in the cache."""
        keep_cache_positions(self.cache, self._tree_base, keep)


def lend_target_to(strategy, prefix_embeds: torch.Tensor, settings: GenerationSettings, model) -> Target | None:
    """The target the strategy's `lender` lends (compile+speculative), else None (the loop builds a DynamicTarget)."""
    if strategy.lender is None:
        return None
    return strategy.lender.lend_target(model, prefix_embeds.shape[1] + settings.max_new_tokens, strategy.ctx.gamma)


@dataclass(frozen=True)
class TreeShape:
    """EAGLE-2 dynamic tree, γ levels deep, `topk` nodes expanded per level, at most `max_nodes`
    drafted nodes verified. Greedy: `topk` children per expanded node, the likeliest `max_nodes`
    kept. Sampling: every drawn child is kept, so each node gets the widest equal number of
    children that fits `max_nodes` (eagle.sampling_branching; at least a chain of γ)."""

    topk: int = 8
    max_nodes: int = 32


@torch.inference_mode()
def speculative_decode(target_llm, prefix_embeds: torch.Tensor, proposer: Proposer, settings: GenerationSettings,
                       gamma: int, stop_ids: set[int], clock: Clock, adaptive_gamma: bool = False,
                       target: Target | None = None, tree: TreeShape | None = None) -> DecodeResult:
    """Draft → one target forward over [pending, d_1..d_k] → accept → roll both caches back.

    prefix_embeds: [1, L, H] the target's spliced prompt. Greedy output equals the target's own
    greedy decoding; sampled output follows the target's distribution (rejection sampling).
    The target cache always holds prefix + committed[:-1]; the last committed token is pending.
    `target` owns that cache: by default a DynamicTarget on target_llm; a static_decode.StaticTarget
    (compile+speculative) verifies on a static cache with a captured forward and crops by position.
    With `tree` (a proposer with `propose_tree`, a DynamicTarget) a γ-deep draft tree is verified
    in one forward instead of a chain: greedy acceptance walks it, sampling uses tree rejection sampling.
    """
    device = prefix_embeds.device
    generator = make_generator(settings, device) if settings.do_sample else None
    counters = SpeculationCounters(gamma=gamma)
    target = target if target is not None else DynamicTarget(target_llm)
    prefix_len = prefix_embeds.shape[1]

    wants_hidden = getattr(proposer, "wants_hidden", False)
    logits = target.prefill(prefix_embeds)
    hidden = target.last_hidden
    counters.target_forwards += 1
    committed = [_pick(logits, settings, generator)]
    clock.mark_first_token()
    if wants_hidden:
        proposer.observe(hidden)  # features of every prefix position
    with clock.phase("draft"):
        proposer.start()

    while len(committed) < settings.max_new_tokens and committed[-1] not in stop_ids:
        budget = min(gamma, settings.max_new_tokens - len(committed) - 1)  # leave room for the bonus token
        if tree is not None:
            proposed, new_tokens, keep, hidden = _tree_step(target, proposer, committed, budget, tree, settings,
                                                            generator, clock, counters)
            accepted = len(new_tokens) - 1
        else:
            proposed, accepted, new_tokens, hidden = _chain_step(target, proposer, committed, budget, settings,
                                                                 generator, clock, counters, device)
            keep = None
        counters.target_forwards += 1
        counters.record(proposed, accepted)
        for token in new_tokens:
            committed.append(token)
            if token in stop_ids or len(committed) >= settings.max_new_tokens:
                break
        if keep is not None:
            target.keep_path(keep)
        target.crop(prefix_len + len(committed) - 1)
        if wants_hidden:
            # features of the pending token + accepted drafts
            proposer.observe(hidden[:, keep] if keep is not None else hidden[:, : accepted + 1])
        proposer.rollback(committed)
        if adaptive_gamma and proposed:
            gamma = gamma + 2 if accepted == proposed else max(1, gamma - 1)
    result_metrics = counters_to_metrics(counters, clock)
    result_metrics["mean_accepted_tokens"] = len(committed) / counters.target_forwards
    if tree is not None:
        result_metrics["tree"] = {"topk": tree.topk, "max_nodes": tree.max_nodes, "depth": counters.gamma,
                                  "mean_nodes": counters.tree_nodes / max(counters.target_forwards - 1, 1)}
    return DecodeResult(committed, result_metrics)


def _chain_step(target: Target, proposer: Proposer, committed: list[int], budget: int, settings: GenerationSettings,
                generator, clock: Clock, counters: SpeculationCounters,
                device: torch.device) -> tuple[int, int, list[int], torch.Tensor]:
    """Draft ≤ budget tokens, verify [pending, d_1..d_k] → (k, accepted, accepted drafts + bonus, hidden [1, k+1, H])."""
    with clock.phase("draft"):
        draft_tokens, p_draft = proposer.propose(committed, budget, settings, generator) if budget > 0 else (
            torch.empty(0, dtype=torch.long, device=device), None)
    k = int(draft_tokens.shape[0])
    counters.draft_forwards += k if budget > 0 else 0
    with clock.phase("verify"):
        verify_ids = torch.cat([torch.tensor([committed[-1]], device=device), draft_tokens.to(device)]).unsqueeze(0)
        logits = target.verify(verify_ids)  # [k+1, V]
        if settings.do_sample:
            p_target = sampling_probs(logits, settings)
            accepted, bonus = rejection_sample(draft_tokens, p_draft, p_target, generator) if k else (
                0, int(torch.multinomial(p_target[0], 1, generator=generator).item()))
        else:
            accepted, bonus = greedy_accept(draft_tokens, logits.argmax(dim=-1)) if k else (0, int(logits[0].argmax().item()))
    return k, accepted, draft_tokens[:accepted].tolist() + [bonus], target.last_hidden


def _tree_step(target, proposer, committed: list[int], budget: int, shape: TreeShape, settings: GenerationSettings,
               generator, clock: Clock, counters: SpeculationCounters) -> tuple[int, list[int], list[int], torch.Tensor]:
    """Draft a ≤ budget-deep tree, verify it in one forward → (tree depth, accepted drafts + bonus,
    kept block offsets [root, path...], hidden [1, N+1, H])."""
    with clock.phase("draft"):
        tree = proposer.propose_tree(committed, budget, shape.topk, shape.max_nodes, settings, generator) if budget > 0 else (
            DraftTree([committed[-1]], [-1]))
    counters.draft_forwards += budget
    counters.tree_nodes += tree.size
    with clock.phase("verify"):
        logits = target.verify_tree(tree)  # [N+1, V]
        if settings.do_sample:
            path, bonus = sample_tree_accept(tree, sampling_probs(logits, settings), generator)
        else:
            path, bonus = greedy_tree_accept(tree, logits.argmax(dim=-1).tolist())
    depth = max(tree.depths())
    return depth, [tree.tokens[node] for node in path] + [bonus], [0] + path, target.last_hidden


def counters_to_metrics(counters: SpeculationCounters, clock: Clock) -> dict:
    draft_ms = clock.phases_ms.get("draft", 0.0)
    verify_ms = clock.phases_ms.get("verify", 0.0)
    verify_steps = max(counters.target_forwards - 1, 0)
    draft_step_ms = draft_ms / counters.draft_forwards if counters.draft_forwards else None
    verify_step_ms = verify_ms / verify_steps if verify_steps else None
    return {"gamma": counters.gamma, "target_forwards": counters.target_forwards, "draft_forwards": counters.draft_forwards,
            "drafted": counters.drafted, "accepted": counters.accepted,
            "accept_rate": counters.accepted / counters.drafted if counters.drafted else None,
            "accepted_by_position": counters.accepted_by_position, "drafted_by_position": counters.drafted_by_position,
            "cost_ratio": draft_step_ms / verify_step_ms if draft_step_ms and verify_step_ms else None}


class CausalLMProposer:
    """Drafts with any causal LM on its own KV cache.

    The draft conditions on `prefix_ids` (a text-only draft: the prompt without the event
    placeholder) or on `prefix_embeds` (a multimodal draft that shares the target's embedding
    width, e.g. the target itself or its first layers).
    """

    def __init__(self, llm, prefix_ids: torch.Tensor | None = None, prefix_embeds: torch.Tensor | None = None):
        assert (prefix_ids is None) != (prefix_embeds is None), "give the draft ids or embeddings"
        self.llm = llm
        self.prefix_ids = prefix_ids  # [L_text]
        self.prefix_embeds = prefix_embeds  # [1, L, H]
        self.device = llm.get_input_embeddings().weight.device
        self.cache = DynamicCache(config=llm.config)
        self.prefix_len = 0
        self.consumed = 0  # committed tokens already in the draft cache
        self._in_cache: list[int] = []

    def start(self) -> None:
        if self.prefix_embeds is not None:
            self.llm(inputs_embeds=self.prefix_embeds.to(self.llm.dtype), past_key_values=self.cache, use_cache=True)
            self.prefix_len = self.prefix_embeds.shape[1]
        else:
            self.llm(input_ids=self.prefix_ids.to(self.device).unsqueeze(0), past_key_values=self.cache, use_cache=True)
            self.prefix_len = self.prefix_ids.shape[0]

    def propose(self, committed, gamma, settings, generator):
        # feed the committed tokens the draft has not seen yet (at least the pending one)
        fresh = torch.tensor(committed[self.consumed:], device=self.device).unsqueeze(0)
        logits = self.llm(input_ids=fresh, past_key_values=self.cache, use_cache=True).logits[0, -1]
        self.consumed = len(committed)
        tokens, probs = [], []
        for step in range(gamma):
            token, p = draft_token(logits, settings, generator)
            tokens.append(token)
            if p is not None:
                probs.append(p)
            if step + 1 < gamma:
                logits = self.llm(input_ids=token.unsqueeze(0), past_key_values=self.cache, use_cache=True).logits[0, -1]
        draft = torch.cat(tokens)
        self._in_cache = draft[:-1].tolist()  # the last draft token was never fed
        return draft, (torch.stack(probs) if probs else None)

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
