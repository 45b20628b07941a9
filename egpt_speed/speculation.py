"""The speculative loop: draft (proposers.py) → one target forward → accept (verify.py) → roll back.

Hand-written because transformers' assisted generation cannot take a multimodal `inputs_embeds`
prefix for the target while a draft of another width sees only the text, and it is batch-1
greedy/sampling only without per-position counters. The loop owns no model: it drives a `Target`
(the verifying model and its KV cache) and a proposer, and counts what happened
(metrics.SpeculationCounters → metrics.speculation_metrics).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import torch
from transformers import DynamicCache

from egpt_speed.decoding import DecodeResult, GenerationSettings, crop_cache, make_generator, with_cache
from egpt_speed.errors import EgptError
from egpt_speed.metrics import SpeculationCounters, ratio, speculation_metrics
from egpt_speed.proposers import Proposer
from egpt_speed.static_decode import HostStaging
from egpt_speed.timing import Clock
from egpt_speed.tree import DraftTree, TreeShape, keep_cache_positions, tree_attention_mask, tree_position_ids
from egpt_speed.verify import ChainDraft, Verdict, verify_draft


class Target(Protocol):
    """The verifying model and its KV cache: DynamicTarget (default) or static_decode.StaticTarget.

    After prefill/verify, `last_hidden` [1, q, H] holds the final-norm hidden states of those q
    positions (what an EAGLE-style drafter reads). Tree drafting also needs `verify_tree` and
    `keep_path` (DynamicTarget has them).
    """

    last_hidden: torch.Tensor | None

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds: [1, L, H] → logits [V] after the last prompt position; the cache holds the prompt."""

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [1, k+1] (pending, d_1..d_k) → logits [k+1, V]; their keys/values join the cache."""

    def crop(self, length: int) -> None:
        """Keep the first `length` cached positions."""


class DynamicTarget:
    """The target on transformers' DynamicCache (crop slices the cache tensors).

    aux_layers (EAGLE-3 heads, `capture_layers`): `last_hidden` then holds the inputs of those
    decoder layers concatenated, [1, q, len(aux_layers) * H], instead of the final-norm states.
    """

    def __init__(self, llm, aux_layers: list[int] | None = None):
        self.llm = llm
        self.cache = DynamicCache(config=llm.config)
        self.last_hidden: torch.Tensor | None = None
        self._tree_base = 0  # cache length before the last verify_tree
        self.aux_layers: list[int] = []
        if aux_layers:
            self.capture_layers(aux_layers)

    def capture_layers(self, aux_layers: list[int]) -> None:
        """Keep the inputs of these decoder layers (vLLM's aux hidden states: id i = the input of
        layer i = HF's hidden_states[i]) as `last_hidden` from the next forward on."""
        count = len(self.llm.model.layers)
        if any(not 0 <= index < count for index in aux_layers):
            raise EgptError(f"the draft head reads target layers {list(aux_layers)}, but the target has layers 0..{count - 1}; "
                            "use a head trained for this target.")
        self.aux_layers = list(aux_layers)

    def _forward(self, last_only: bool = False, **inputs) -> torch.Tensor:
        """One forward on the cache → logits [T, V] (the last position only for prefill, as generate
        does); keeps the hidden states an EAGLE-style head drafts from: post-norm [1, T, H], or the
        aux layers' inputs [1, T, 3H]."""
        with capture_layer_inputs(self.llm.model.layers, self.aux_layers) as captured:
            hidden = self.llm.model(**with_cache(self.cache, **inputs)).last_hidden_state
        self.last_hidden = torch.cat([captured[index] for index in self.aux_layers], dim=-1) if self.aux_layers else hidden
        return self.llm.lm_head(hidden[:, -1:] if last_only else hidden)[0]

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        return self._forward(last_only=True, inputs_embeds=embeds)[-1]

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids=tokens)

    def crop(self, length: int) -> None:
        crop_cache(self.cache, length)

    def verify_tree(self, tree: DraftTree) -> torch.Tensor:
        """All N+1 tree nodes in one forward under the tree mask → logits [N+1, V]; the cache then
        holds every node until `keep_path`."""
        base = self.cache.get_seq_length()
        device = self.llm.lm_head.weight.device
        inputs = torch.tensor(tree.tokens, device=device).unsqueeze(0)
        self._tree_base = base
        return self._forward(input_ids=inputs, attention_mask=tree_attention_mask(tree, base, self.llm.dtype, device),
                             position_ids=tree_position_ids(tree, base, device))

    def keep_path(self, keep: list[int]) -> None:
        """After verify_tree: keep the root and the accepted path (block offsets) in the cache."""
        keep_cache_positions(self.cache, self._tree_base, keep)


@contextmanager
def capture_layer_inputs(layers, indices: list[int]):
    """{index: the hidden states [B, T, H] entering layers[index]} for the forwards run inside; the hooks
    (one per index, none when empty) are removed on exit, so other users of the model never see them."""
    captured: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    handles = [layers[index].register_forward_pre_hook(hook_for(index), with_kwargs=True) for index in set(indices)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def speculative_decode(target: Target, prefix_embeds: torch.Tensor, proposer: Proposer, settings: GenerationSettings,
                       gamma: int, stop_ids: set[int], clock: Clock, adaptive_gamma: bool = False,
                       tree: TreeShape | None = None) -> DecodeResult:
    """Draft → one target forward over [pending, d_1..d_k] → accept → roll both caches back.

    prefix_embeds: [1, L, H] the target's spliced prompt. Greedy output equals the target's own
    greedy decoding; sampled output follows the target's distribution (rejection sampling).
    The target's cache always holds prefix + committed[:-1]; the last committed token is pending.
    With `tree` (a proposer with `propose_tree`, a target with `verify_tree`) a γ-deep draft tree
    is verified in one forward instead of a chain.
    """
    generator = make_generator(settings, prefix_embeds.device) if settings.do_sample else None
    counters = SpeculationCounters(gamma=gamma)
    prefix_len = prefix_embeds.shape[1]
    # the first token is a verdict on an empty draft: the same greedy/sampled choice as every bonus
    first = verify_draft(target.prefill(prefix_embeds)[None], ChainDraft.empty(prefix_embeds.device), settings, generator)
    counters.target_forwards += 1
    committed = [first.bonus]
    clock.mark_first_token()
    proposer.observe(target.last_hidden)  # features of every prefix position
    with clock.phase("draft"):
        proposer.start()
    # token ids and tree paths travel host → device through pinned buffers: a pageable copy would stall
    # the host until the device is idle, a second sync per step besides the verdict's read-back
    pending = _PendingToken(prefix_embeds.device)
    path_staging = HostStaging(gamma + 1, prefix_embeds.device) if tree is not None else None
    while len(committed) < settings.max_new_tokens and committed[-1] not in stop_ids:
        budget = min(gamma, settings.max_new_tokens - len(committed) - 1)  # leave room for the bonus token
        if tree is None:
            proposed, verdict = _chain_step(target, proposer, pending.load(committed[-1]), committed, budget,
                                            settings, generator, clock, counters)
        else:
            proposed, verdict = _tree_step(target, proposer, committed, budget, tree, settings, generator, clock, counters)
        counters.record(proposed, len(verdict.accepted))
        committed += cut_at_stop(verdict.tokens, stop_ids, settings.max_new_tokens - len(committed))
        if tree is not None:
            target.keep_path([0] + verdict.path)  # block offsets: the root, then the accepted path
            kept_hidden = _select_positions(target.last_hidden, [0] + verdict.path, path_staging)
        else:
            kept_hidden = target.last_hidden[:, :len(verdict.accepted) + 1]  # pending + accepted drafts
        target.crop(prefix_len + len(committed) - 1)
        proposer.observe(kept_hidden)
        proposer.rollback(committed)
        if adaptive_gamma and proposed:
            gamma = gamma + 2 if len(verdict.accepted) == proposed else max(1, gamma - 1)
    return DecodeResult(committed, _result_metrics(counters, len(committed), clock, tree))


def cut_at_stop(tokens: list[int], stop_ids: set[int], room: int) -> list[int]:
    """The step's tokens up to and including the first stop id, at most `room` of them."""
    for index, token in enumerate(tokens[:room]):
        if token in stop_ids:
            return tokens[:index + 1]
    return tokens[:room]


class _PendingToken:
    """The last committed token as a [1] device tensor, copied from a pinned buffer (no host stall)."""

    def __init__(self, device: torch.device):
        self.staging = HostStaging(1, device)
        self.device_ids = torch.zeros(1, dtype=torch.long, device=device)  # [1]

    def load(self, token: int) -> torch.Tensor:
        self.device_ids = torch.empty_like(self.device_ids)  # a fresh tensor: the previous may still be read
        self.staging.copy_to([token], self.device_ids)
        return self.device_ids


def _select_positions(hidden: torch.Tensor, positions: list[int], staging: HostStaging) -> torch.Tensor:
    """hidden [1, q, H] → [1, len(positions), H], the index list copied through a pinned buffer."""
    if positions == list(range(len(positions))):
        return hidden[:, :len(positions)]
    index = torch.empty(len(positions), dtype=torch.long, device=hidden.device)
    staging.copy_to(positions, index)
    return hidden.index_select(1, index)


def _chain_step(target: Target, proposer: Proposer, pending: torch.Tensor, committed: list[int], budget: int,
                settings: GenerationSettings, generator: torch.Generator | None, clock: Clock,
                counters: SpeculationCounters) -> tuple[int, Verdict]:
    """Draft ≤ budget tokens, verify [pending, d_1..d_k] in one forward → (k, verdict). pending: [1] on the device."""
    with clock.phase("draft"):
        draft = proposer.propose(committed, budget, settings, generator)
    proposed = int(draft.tokens.shape[0])
    counters.draft_forwards += proposed
    with clock.phase("verify"):
        logits = target.verify(torch.cat([pending, draft.tokens]).unsqueeze(0))  # [k+1, V]
        verdict = verify_draft(logits, draft, settings, generator)
    return proposed, verdict


def _tree_step(target, proposer, committed: list[int], budget: int, shape: TreeShape, settings: GenerationSettings,
               generator: torch.Generator | None, clock: Clock, counters: SpeculationCounters) -> tuple[int, Verdict]:
    """Draft a ≤ budget-deep tree, verify all its nodes in one forward → (tree depth, verdict)."""
    with clock.phase("draft"):
        tree = proposer.propose_tree(committed, budget, shape.topk, shape.max_nodes, settings, generator)
    counters.draft_forwards += budget
    counters.tree_nodes += tree.size
    with clock.phase("verify"):
        verdict = verify_draft(target.verify_tree(tree), tree, settings, generator)  # logits [N+1, V]
    return max(tree.depths()), verdict


def _result_metrics(counters: SpeculationCounters, num_tokens: int, clock: Clock, tree: TreeShape | None) -> dict:
    result = speculation_metrics(counters, num_tokens, clock.phases_ms.get("draft", 0.0), clock.phases_ms.get("verify", 0.0))
    if tree is not None:
        result["tree"] = {"topk": tree.topk, "max_nodes": tree.max_nodes, "depth": counters.gamma,
                          "mean_nodes": ratio(counters.tree_nodes, counters.verify_steps)}
    return result
