"""A draft tree (EAGLE-2 style) and what verifying it in one target forward needs.

Node 0 is the root: the pending token, whose keys/values are not cached yet. Nodes 1..N are drafted
tokens; `parents[i]` is node i's parent (0 for depth 1). The target scores all N+1 in one forward
where node i sees the cache, its ancestors and itself (`tree_attention_mask`) at position
base + depth(i) (`tree_position_ids`); greedy acceptance walks from the root along the child that
matches the target's argmax (`greedy_tree_accept`), and the cache keeps only that path
(`keep_cache_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: list[int]  # [N + 1] node tokens, tokens[0] = the pending (root) token
    parents: list[int]  # [N + 1] parents[0] = -1, else an earlier node index
    # sampled trees: node → the draft distribution [V] its children were drawn from, without
    # replacement, in node order (greedy trees: None)
    child_probs: dict[int, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a draft tree needs a root (parent -1) and one parent per token")
        if any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise ValueError("each node's parent must be an earlier node")

    @property
    def size(self) -> int:
        """Drafted nodes, root excluded."""
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        depths = [0] * len(self.tokens)
        for node in range(1, len(self.tokens)):
            depths[node] = depths[self.parents[node]] + 1
        return depths

    def ancestry(self) -> torch.Tensor:
        """[N+1, N+1] bool: [i, j] is True when j is i or one of i's ancestors."""
        count = len(self.tokens)
        allowed = torch.eye(count, dtype=torch.bool)
        for node in range(1, count):
            allowed[node] |= allowed[self.parents[node]]
        return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[q, k] bool (True = may attend) → the [1, 1, q, k] additive mask attention layers take."""
    allowed = allowed.to(device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def tree_attention_mask(tree: DraftTree, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, N+1, past_len + N+1] additive mask: every node sees the cache, its ancestors and itself."""
    count = len(tree.tokens)
    return additive_mask(torch.cat([torch.ones(count, past_len, dtype=torch.bool), tree.ancestry()], dim=1), dtype, device)


def tree_position_ids(tree: DraftTree, base: int, device: torch.device) -> torch.Tensor:
    """[1, N+1] absolute positions: the root at `base`, a depth-d node at base + d."""
    return (torch.tensor(tree.depths(), device=device) + base).unsqueeze(0)


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


def keep_cache_positions(cache, base: int, keep: list[int]) -> None:
    """Compact a transformers DynamicCache after a tree verify: block offsets `keep` (root = 0, then
    the accepted path) move to base, base+1, ...; everything after them is dropped."""
    first_moved = next((i for i, offset in enumerate(keep) if offset != i), len(keep))  # a leading run stays put
    if first_moved < len(keep):
        index = torch.tensor(keep[first_moved:], dtype=torch.long) + base
        stop = base + len(keep)
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                tensor[..., base + first_moved:stop, :] = tensor.index_select(-2, index.to(tensor.device))
    excess = cache.get_seq_length() - (base + len(keep))
    if excess > 0:
        cache.crop(-excess)
