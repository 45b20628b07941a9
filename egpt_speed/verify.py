"""The verifier: which drafted tokens the target keeps, and the token it adds after them.

Names follow Leviathan et al. (2023): ``p_target`` is the target model's distribution (their p),
``p_draft`` the draft's (their q). A chain draft is d_1..d_γ; the target scores [pending, d_1..d_γ]
in one forward, giving γ+1 next-token distributions. *Accepted* tokens are the draft tokens kept;
the *bonus* token is the one the target adds after them (a correction where a draft token was
rejected, or a free extra token when all were accepted). A tree draft (tree.DraftTree) is verified
the same way along one root-to-node path. `verify_draft` is the one place that picks greedy
acceptance or rejection sampling (from the generation settings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from egpt_speed.decoding import GenerationSettings, sampling_probs
from egpt_speed.tree import DraftTree


@dataclass(frozen=True)
class ChainDraft:
    """What a proposer drafts after the committed tokens (k may be 0)."""

    tokens: torch.Tensor  # [k] draft token ids
    p_draft: torch.Tensor | None = None  # [k, V] the distribution each was drawn from (sampling only)

    @staticmethod
    def empty(device: torch.device) -> "ChainDraft":
        return ChainDraft(torch.empty(0, dtype=torch.long, device=device))


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one draft."""

    accepted: list[int]  # accepted draft tokens, in order
    bonus: int
    path: list[int]  # tree: accepted node indices (root excluded); chain: positions 0..n-1

    @property
    def tokens(self) -> list[int]:
        """Accepted tokens + bonus: what this step commits (before EOS / max_new_tokens cuts)."""
        return self.accepted + [self.bonus]


def verify_draft(logits: torch.Tensor, draft: ChainDraft | DraftTree, settings: GenerationSettings,
                 generator: torch.Generator | None) -> Verdict:
    """logits: [k+1, V] (chain: after pending, d_1..d_k) or [N+1, V] (tree: after each node).

    Greedy: the longest draft prefix (tree: path) equal to the target's argmax. Sampling: the
    target's logits are tempered and top-p filtered exactly as a sampled baseline draws
    (decoding.sampling_probs), then rejection sampling keeps the output distributed as that.
    """
    if settings.do_sample:
        p_target = sampling_probs(logits, settings)  # [k+1, V]
        if isinstance(draft, DraftTree):
            path, bonus = sample_tree_accept(draft, p_target, generator)
            return Verdict([draft.tokens[node] for node in path], bonus, path)
        accepted, bonus = rejection_sample(draft.tokens, draft.p_draft, p_target, generator)
    else:
        target_argmax = logits.argmax(dim=-1)  # [k+1]
        if isinstance(draft, DraftTree):
            # a device-built tree is read back together with the argmax: one sync per step
            read_back = getattr(draft, "read_back_with", None)
            host_argmax = read_back(target_argmax) if read_back is not None else target_argmax.tolist()
            path, bonus = greedy_tree_accept(draft, host_argmax)
            return Verdict([draft.tokens[node] for node in path], bonus, path)
        accepted, host_argmax = greedy_accept_host(draft.tokens, target_argmax)
        # greedy: the accepted drafts equal the target's argmax there, so no second read of the draft
        return Verdict(host_argmax[:accepted], host_argmax[accepted], list(range(accepted)))
    return Verdict(draft.tokens[:accepted].tolist(), bonus, list(range(accepted)))


def greedy_accept(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of the draft equal to the target's greedy choices, plus the bonus token.

    draft_tokens: [γ] ; target_argmax: [γ+1] (target's argmax after each of pending, d_1..d_γ).
    Returns (accepted count n, bonus token = target_argmax[n]). One host sync.
    """
    gamma = draft_tokens.shape[0]
    mismatch = (draft_tokens != target_argmax[:gamma]).int()
    # index of the first mismatch, γ when none: cumsum is 0 exactly on the matching prefix
    accepted = int((mismatch.cumsum(0) == 0).sum().item())
    return accepted, int(target_argmax[accepted].item())


def greedy_accept_host(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, list[int]]:
    """greedy_accept with one device → host read: (accepted count n, the target's argmax [k+1] as a list)."""
    gamma = draft_tokens.shape[0]
    mismatch = (draft_tokens != target_argmax[:gamma]).int()
    accepted = (mismatch.cumsum(0) == 0).sum().view(1)
    values = torch.cat([accepted, target_argmax]).tolist()
    return values[0], values[1:]


def rejection_sample(draft_tokens: torch.Tensor, p_draft: torch.Tensor | None, p_target: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling: the output is distributed exactly as sampling from p_target.

    draft_tokens: [γ] ; p_draft: [γ, V] (the draft's distribution each d_i was drawn from; None
    when γ = 0) ; p_target: [γ+1, V]. Accept d_i with probability min(1, p_target(d_i) / p_draft(d_i));
    at the first rejection draw the bonus from norm(max(0, p_target − p_draft)); if all are accepted
    draw it from p_target[γ]. Returns (accepted count n, bonus token).
    """
    gamma = draft_tokens.shape[0]
    accepted = gamma
    if gamma:
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


def greedy_tree_accept(tree: DraftTree, target_argmax: list[int]) -> tuple[list[int], int]:
    """Walk from the root while a child holds the target's greedy token.

    target_argmax: [N+1] the target's argmax after each node. Returns (accepted node indices in
    path order, root excluded; bonus token = the target's argmax after the last accepted node).
    """
    children: dict[int, dict[int, int]] = {}
    for node in range(1, len(tree.tokens)):
        children.setdefault(tree.parents[node], {}).setdefault(tree.tokens[node], node)
    path, node = [], 0
    while True:
        wanted = target_argmax[node]
        child = children.get(node, {}).get(wanted)
        if child is None:
            return path, wanted
        path.append(child)
        node = child


def sample_tree_accept(tree: DraftTree, p_target: torch.Tensor, generator: torch.Generator | None) -> tuple[list[int], int]:
    """Tree speculative sampling: the emitted tokens follow the target's distribution exactly.

    p_target: [N+1, V] the target's sampling distribution after each node. At a node, its children
    c_1, c_2, ... (drawn without replacement from q = child_probs[node], in that order) are tried in
    turn: c_i is accepted with probability min(1, p(c_i) / q(c_i)); on rejection p becomes
    norm(max(p − q, 0)) and c_i's mass leaves q (renormalised) — each try is one standard
    speculative-sampling step for the distribution the output must still follow (SpecInfer; Sequoia
    for drawing without replacement). An accepted child becomes the node; when all are rejected,
    or a node has none, the bonus token is drawn from the current p. Returns (path, bonus).
    """
    children: dict[int, list[int]] = {}
    for node in range(1, len(tree.tokens)):
        children.setdefault(tree.parents[node], []).append(node)
    path, node = [], 0
    while True:
        p = p_target[node]
        accepted = None
        if children.get(node):
            q = tree.child_probs[node].to(p.device, p.dtype).clone()
            for child in children[node]:
                token = tree.tokens[child]
                u = torch.rand((), device=p.device, generator=generator)
                if bool(u * q[token] <= p[token]):  # the one host sync per try
                    accepted = child
                    break
                # p = q exactly leaves no residual; such a p rejects nothing, so keeping p is exact
                residual = (p - q).clamp_min(0.0)
                total = residual.sum()
                p = torch.where(total > 0, residual / total.clamp_min(torch.finfo(p.dtype).tiny), p)
                q[token] = 0.0  # later children were drawn without it; their mass is positive
                q = q / q.sum()
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator).item())
        path.append(accepted)
        node = accepted
