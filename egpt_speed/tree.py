"""A draft tree (EAGLE-2 style) and what verifying it in one target forward needs.

Node 0 is the root: the pending token, whose keys/values are not cached yet. Nodes 1..N are drafted
tokens; `parents[i]` is node i's parent (0 for depth 1). The target scores all N+1 in one forward
where node i sees the cache, its ancestors and itself (`tree_attention_mask`) at position
base + depth(i) (`tree_position_ids`); the verifier (verify.py) walks it from the root, and the
cache keeps only the accepted path (`keep_cache_positions`). A drafter builds the tree from a pool of
scored candidates (`select_tree`), its draft model reading the pool under `pool_tree_mask`.
"""

from __future__ import annotations

import heapq
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


@dataclass(frozen=True)
class TreeShape:
    """EAGLE-2 dynamic tree, γ levels deep, `topk` nodes expanded per level, at most `max_nodes`
    drafted nodes verified. Greedy: `topk` children per expanded node, the likeliest `max_nodes`
    kept. Sampling: every drawn child is kept, so each node gets the widest equal number of
    children that fits `max_nodes` (`sampling_branching`; at least a chain of γ)."""

    topk: int = 8
    max_nodes: int = 32


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


def pool_tree_mask(frontier: list[int], parents: list[int], slots: dict[int, int], base: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, m, base + len(slots)] additive mask while a drafter expands a candidate pool level by level:
    frontier node i sees the drafter's cache (`base` positions), the slots of its ancestors and its own.

    parents: pool index → parent pool index (-1 = root); slots: pool index → drafter-cache slot.
    """
    allowed = torch.zeros(len(frontier), base + len(slots), dtype=torch.bool)
    allowed[:, :base] = True
    for row, node in enumerate(frontier):
        while node != -1:
            allowed[row, base + slots[node]] = True
            node = parents[node]
    return additive_mask(allowed, dtype, device)


def _blockers(index: int, parents: list[int], previous_sibling: list[int]) -> list[int]:
    return [b for b in (parents[index], previous_sibling[index]) if b != -1]


def _best_closed_subset(scores: list[float], parents: list[int], max_nodes: int) -> set[int]:
    """Greedy best-first: a candidate becomes eligible once its parent and previous sibling are kept."""
    previous_sibling, last_child = [-1] * len(scores), {}
    for index, parent in enumerate(parents):
        previous_sibling[index] = last_child.get(parent, -1)
        last_child[parent] = index
    waiting: dict[int, list[int]] = {}  # a candidate's blocker (parent or earlier sibling) → candidates
    ready: list[tuple[float, int]] = []
    for index in range(len(scores)):
        blockers = _blockers(index, parents, previous_sibling)
        if blockers:
            waiting.setdefault(max(blockers), []).append(index)  # the later blocker is taken last
        else:
            heapq.heappush(ready, (-scores[index], index))
    kept: set[int] = set()
    while ready and len(kept) < max_nodes:
        _, index = heapq.heappop(ready)
        kept.add(index)
        for candidate in waiting.pop(index, []):
            missing = [b for b in _blockers(candidate, parents, previous_sibling) if b not in kept]
            if missing:
                waiting.setdefault(missing[0], []).append(candidate)
            else:
                heapq.heappush(ready, (-scores[candidate], candidate))
    return kept


def select_tree(root_token: int, tokens: list[int], scores: list[float], parents: list[int], max_nodes: int,
                child_probs: dict[int, torch.Tensor] | None = None) -> DraftTree:
    """The `max_nodes` best pool candidates as a DraftTree, best first, taking a candidate only once its
    parent and its earlier siblings are taken: the tree is ancestor-closed and each node keeps a prefix of
    its children in draw order (what tree rejection sampling assumes); nodes are ordered parents first.

    tokens, scores (log-probability of the path), parents (pool index, -1 = root): one entry per
    candidate, parents and earlier siblings listed first; child_probs: pool index (-1 = root) → the
    distribution [V] its children were drawn from (sampled trees).
    """
    kept = _best_closed_subset(scores, parents, max_nodes)
    node_of = {-1: 0}
    tree_tokens, tree_parents = [root_token], [-1]
    for index in sorted(kept):  # pool order lists parents and earlier siblings first
        node_of[index] = len(tree_tokens)
        tree_tokens.append(tokens[index])
        tree_parents.append(node_of[parents[index]])
    probs = {node_of[index]: q for index, q in (child_probs or {}).items() if index in node_of}
    return DraftTree(tree_tokens, tree_parents, probs or None)
