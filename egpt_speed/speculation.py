"""Verification of drafted tokens, shared by every speculative strategy.

Names follow Leviathan et al. (2023): ``p_target`` is the target model's distribution (their p),
``p_draft`` the draft's (their q). Per step the draft proposes γ tokens d_1..d_γ; the target scores
[last token, d_1..d_γ] in one forward, giving γ+1 next-token distributions. *Accepted* tokens are
the draft tokens kept; the *bonus* token is the one the target adds after them (a correction
where a draft token was rejected, or a free extra token when all γ were accepted).
"""

from __future__ import annotations

import torch


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
