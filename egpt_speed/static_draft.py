"""EAGLE drafting with no host sync inside the draft: the head on a static KV cache, its steps captured.

`StaticEagleDrafter` is a proposer (start / observe / propose / propose_tree / rollback, greedy)
for the speculative loop, meant for the compiled static-cache target (`compile+eagle`,
`compile+eagle-tree`). Per verify step it replays at most two CUDA graphs:

- `catchup`: the head reads the ≤ γ+1 target features the last verify accepted (padded to γ+1,
  written at their slots) and predicts the next feature into `_predicted`;
- `chain` (γ head steps: argmax over the draft vocabulary, embed, one head forward) or
  `tree{d}` (EAGLE-2: d levels of top-k expansion on the device, the best `max_nodes` candidates
  selected by a stable sort, the tree's parents, depths and ancestry built by index arithmetic).

An EAGLE-3 head (eagle_formats.Eagle3Head) reads the inputs of three target layers: the drafter's
`aux_layers` go to the target's capture_layers, and its catch-up buffer is that wide (3H).

Draft tokens stay on the device; a tree is read back once, lazily (`PendingTree`: its tokens and
parents, for the acceptance walk, after the target's verify was queued). Greedy drafts equal `eagle.EagleProposer`'s (same head, same arithmetic up to
the masked keys SDPA skips). Rollback is free: drafted head-cache slots are hidden by the mask
(query at position p sees slots ≤ p) and overwritten by the next catch-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from egpt_speed.eagle import EagleHead
from egpt_speed.errors import EgptError
from egpt_speed.proposers import Proposer
from egpt_speed.static_decode import (HostStaging, StaticKVCache, capture_cuda_graph, prefill_bucket, round_up,
                                      with_decode_attention)
from egpt_speed.tree import DraftTree
from egpt_speed.verify import ChainDraft


@dataclass
class DeviceTree(DraftTree):
    """A DraftTree whose verify inputs also live on the device: (tokens [n], depths [n], ancestry [n, n] bool)."""

    device_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


class PendingTree(DeviceTree):
    """A DeviceTree still on the device: its host tokens and parents are read back on first use.

    The speculative loop reads them only to walk the verdict, after the target's verify_tree was
    queued behind the draft: that one read-back then waits for draft and verify together, instead
    of stopping the host between them. `size` needs no read-back (the node count is fixed).
    """

    def __init__(self, root: int, packed: torch.Tensor, device_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        # no DraftTree.__init__: its checks would read the tree back now
        self._root, self._packed = root, packed  # packed: [2N] drafted tokens, then their parents (the drafter's buffer)
        self._host: tuple[list[int], list[int]] | None = None
        self.child_probs = None
        self.device_inputs = device_inputs

    def materialize(self) -> tuple[list[int], list[int]]:
        """(tokens, parents) on the host; must run before the drafter's next tree overwrites its buffer."""
        if self._host is None:
            self._unpack(self._packed.tolist())
        return self._host

    def read_back_with(self, extra: torch.Tensor) -> list[int]:
        """Reads the tree and `extra` ([n] long, e.g. the target's argmax per node) in one device → host copy."""
        if self._host is not None:
            return extra.tolist()
        values = torch.cat([self._packed, extra.to(self._packed.device)]).tolist()
        self._unpack(values[:self._packed.shape[0]])
        return values[self._packed.shape[0]:]

    def _unpack(self, packed: list[int]) -> None:
        drafted = len(packed) // 2
        self._host = ([self._root] + packed[:drafted], [-1] + packed[drafted:])

    @property
    def tokens(self) -> list[int]:
        return self.materialize()[0]

    @property
    def parents(self) -> list[int]:
        return self.materialize()[1]

    @property
    def size(self) -> int:
        return self._packed.shape[0] // 2


class _Graphs:
    """Named bodies, run eagerly or captured once as CUDA graphs (warm-up on a side stream first); with a
    compile mode, each body is compiled by inductor (fullgraph, static shapes) before it is captured."""

    def __init__(self, device: torch.device, capture: bool, dtype: torch.dtype = torch.float32,
                 compile_mode: str | None = None):
        self.device, self.capture, self.dtype, self.compile_mode = device, capture, dtype, compile_mode
        self.steps: dict[str, object] = {}
        self._keep: list[torch.cuda.CUDAGraph] = []

    def run(self, name: str, body, compile: bool = True) -> None:
        if name not in self.steps:
            self.steps[name] = self._prepare(body, compile)
        self.steps[name]()

    def _prepare(self, body, compile: bool = True):
        if self.compile_mode is not None and compile:  # inductor fuses the draft's many small ops before the capture
            body = torch.compile(body, mode=self.compile_mode, fullgraph=True, dynamic=False)
        if not self.capture:
            return body
        graph = capture_cuda_graph(with_decode_attention(body, self.device, self.dtype), self.device, warmup=2)
        self._keep.append(graph)
        return graph.replay

    def clear(self) -> None:
        self.steps.clear()
        self._keep.clear()


class StaticEagleDrafter(Proposer):
    """Greedy EAGLE chain/tree drafting on a static head cache; one instance serves every sample (begin())."""

    wants_hidden = True

    def __init__(self, head: EagleHead, target_llm, gamma: int, topk: int = 8, max_nodes: int = 32,
                 cuda_graph: bool | None = None, compile_mode: str | None = None, bucket_prompt: bool | None = None):
        self.head = head
        # an EAGLE-3 head reads the inputs of three target layers (the target's capture_layers), else the last layer
        self.aux_layers: list[int] | None = head.aux_layers_for(len(target_llm.model.layers))
        self.embed = target_llm.get_input_embeddings()
        self.lm_head = target_llm.lm_head
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.gamma, self.topk, self.max_nodes = gamma, topk, max_nodes
        self.width = gamma + 1  # a verify accepts at most γ drafts + the pending token: ≤ γ+1 fresh features
        capture = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graphs = _Graphs(self.device, capture, self.dtype, compile_mode)
        # the prompt's catch-up padded to PREFILL_BUCKET, one captured graph per bucket (as the target's prefill)
        self.bucket_prompt = capture if bucket_prompt is None else bucket_prompt
        self.cache: StaticKVCache | None = None
        self.prefix_embeds: torch.Tensor | None = None

    # ---- setup and per-sample state -------------------------------------------------------------

    @torch.inference_mode()
    def setup(self, max_seq: int) -> None:
        """Head cache for max_seq positions, plus the padded catch-up and the drafted slots past the end."""
        room = max_seq + self.width + max(self.gamma, (self.gamma - 1) * self.topk) + 1
        if self.cache is not None and self.cache.max_len >= room:
            return
        self.graphs.clear()
        max_len = round_up(room)
        device, hidden = self.device, self.head.config.hidden_size
        self.cache = StaticKVCache(self.head.config, 1, max_len, self.dtype, device)
        self.feature_size = self.embed.weight.shape[1] * len(self.aux_layers or [None])
        long = dict(dtype=torch.long, device=device)
        self._kv_positions = torch.arange(max_len, **long).view(1, 1, 1, max_len)  # [1, 1, 1, M]
        self._features = torch.zeros(1, self.width, self.feature_size, dtype=self.dtype, device=device)  # [1, W, F]
        self._next_ids = torch.zeros(1, self.width, **long)  # [1, W] input after each feature's position
        self._arange = torch.arange(self.width, **long)  # [W]
        self._feature_slots = torch.zeros(self.width, **long)  # [W] consumed + arange
        self._last = torch.zeros(1, **long)  # [1] index of the last real feature
        self._observed = torch.zeros(1, **long)  # [1] position of the first drafted token
        self._predicted = torch.zeros(1, 1, hidden, dtype=self.dtype, device=device)  # [1, 1, H] f̂ at `observed`
        self._draft = torch.zeros(self.gamma, **long)  # [γ] chain drafts
        self._trees: dict[int, dict[str, torch.Tensor]] = {}
        self._prompts: dict[int, dict[str, torch.Tensor]] = {}  # per bucket: padded features, next embeds, slots, last
        self._true = torch.ones((), dtype=torch.bool, device=device)  # index_put_ value (no host scalar in a capture)
        self._ids_staging = HostStaging(self.width, device)
        self._pending: PendingTree | None = None  # the last tree, until read back

    @torch.inference_mode()
    def begin(self, prefix_embeds: torch.Tensor, max_new_tokens: int) -> "StaticEagleDrafter":
        """Start a sample: prefix_embeds [1, L, H] is the target's spliced prompt."""
        self.setup(prefix_embeds.shape[1] + max_new_tokens)
        self.cache.reset()
        self.prefix_embeds = prefix_embeds
        self.prefix_len = prefix_embeds.shape[1]
        self.fresh: list[torch.Tensor] = []  # target features [1, T_i, H] the head has not read
        self.observed = 0  # target positions with a known feature
        self.consumed = 0  # positions already in the head's cache
        return self

    # ---- the proposer interface -------------------------------------------------------------------

    def observe(self, hidden: torch.Tensor) -> None:
        if hidden.shape[-1] != self.feature_size:
            raise EgptError(f"this drafter reads features of width {self.feature_size} (target layers {self.aux_layers}), "
                            f"but the target passed width {hidden.shape[-1]}; call the target's capture_layers first.")
        self.fresh.append(hidden)
        self.observed += hidden.shape[1]

    def rollback(self, committed: list[int]) -> None:
        pass  # drafted head slots are masked off and overwritten by the next catch-up

    @torch.inference_mode()
    def propose(self, committed: list[int], gamma: int, settings, generator) -> ChainDraft:
        """→ γ' ≤ γ greedy draft tokens, on the device. All γ steps run (one graph); the extra ones are dropped."""
        self._refuse_sampling(settings)
        self._catch_up(committed)
        self.graphs.run("chain", self._chain_body)
        return ChainDraft(self._draft[:gamma].clone())

    @torch.inference_mode()
    def propose_tree(self, committed: list[int], depth: int, topk: int, max_nodes: int, settings=None,
                     generator=None) -> DeviceTree:
        """EAGLE-2's dynamic tree, `depth` levels, built on the device; one host read-back at the end."""
        self._refuse_sampling(settings)
        if (topk, max_nodes) != (self.topk, self.max_nodes):
            raise EgptError(f"this drafter was built for trees of top-{self.topk}, {self.max_nodes} nodes; "
                            f"got top-{topk}, {max_nodes}.")
        if self._pending is not None:  # its buffers are about to be overwritten
            self._pending.materialize()
            self._pending = None
        self._catch_up(committed)
        if depth == 0:
            return DeviceTree([committed[-1]], [-1])  # no room left: the root alone (its bonus token)
        buffers = self._tree_buffers(depth)
        self.graphs.run(f"tree{depth}", lambda: self._tree_body(depth, buffers))
        buffers["tokens"][0].fill_(committed[-1])  # the root: the pending token
        self._pending = PendingTree(committed[-1], buffers["packed"],
                                    (buffers["tokens"], buffers["depths"], buffers["ancestry"]))
        return self._pending

    @staticmethod
    def _refuse_sampling(settings) -> None:
        if settings is not None and settings.do_sample:
            raise EgptError("the captured EAGLE drafter is greedy; drop --do-sample or use eagle without compile.")

    # ---- catch-up: feed the head the features the target accepted --------------------------------

    def _catch_up(self, committed: list[int]) -> None:
        fresh = torch.cat(self.fresh, dim=1) if len(self.fresh) > 1 else self.fresh[0]  # [1, T, H]
        self.fresh = []
        count = fresh.shape[1]
        assert count == self.observed - self.consumed, (fresh.shape, self.observed, self.consumed)
        first = self.consumed
        ids = committed[first + 1 - self.prefix_len:self.observed + 1 - self.prefix_len] if first + 1 >= self.prefix_len else None
        if first == 0 and self.bucket_prompt:  # the prompt (once per sample): padded to its bucket, captured
            self._prompt_catch_up(fresh, self._next_embeds(first, committed))
        elif ids is None or count > self.width:  # the prompt, eager (variable length)
            self._head_forward_into_predicted(fresh, self._next_embeds(first, committed), first)
        else:
            self._features[:, :count].copy_(fresh)
            self._ids_staging.copy_to(ids, self._next_ids[0, :count])
            torch.add(self._arange, first, out=self._feature_slots)
            self._last.fill_(count - 1)
            self.graphs.run("catchup", self._catchup_body)
        self._observed.fill_(self.observed)
        self.consumed = self.observed

    def _next_embeds(self, start: int, committed: list[int]) -> torch.Tensor:
        """Embeddings of the inputs at positions start+1 .. observed (prefix rows, then committed tokens)."""
        rows = [self.prefix_embeds[:, start + 1:min(self.observed + 1, self.prefix_len)]]
        first_token = max(start + 1, self.prefix_len) - self.prefix_len
        ids = committed[first_token:self.observed + 1 - self.prefix_len]
        if ids:
            rows.append(self.embed(torch.tensor(ids, device=self.device)).unsqueeze(0))
        return torch.cat(rows, dim=1).to(self.dtype)

    def _prompt_catch_up(self, features: torch.Tensor, next_embeds: torch.Tensor) -> None:
        """features, next_embeds: [1, L, ·] of prompt positions 0..L-1 → _predicted, as one graph per bucket.
        The padding's head-cache slots are hidden by every later mask until the catch-up overwrites them."""
        count = features.shape[1]
        bucket = prefill_bucket(count, self.cache.max_len)
        if bucket not in self._prompts:
            zeros = dict(dtype=self.dtype, device=self.device)
            self._prompts[bucket] = {"features": torch.zeros(1, bucket, self.feature_size, **zeros),
                                     "next": torch.zeros(1, bucket, next_embeds.shape[-1], **zeros),
                                     "slots": torch.arange(bucket, device=self.device),
                                     "last": torch.zeros(1, dtype=torch.long, device=self.device)}
        buffers = self._prompts[bucket]
        for name, rows in (("features", features), ("next", next_embeds)):
            buffers[name][:, :count].copy_(rows)
            buffers[name][:, count:].zero_()
        buffers["last"].fill_(count - 1)
        # captured without inductor (as the target's prefill): every bucket would otherwise recompile one
        # lambda, inside a timed sample, and fullgraph compiles stop at dynamo's recompile limit
        self.graphs.run(f"prompt{bucket}", lambda: self._prompt_body(buffers), compile=False)

    def _prompt_body(self, buffers: dict[str, torch.Tensor]) -> None:
        out = self._head(buffers["features"], buffers["next"], buffers["slots"])
        self._predicted.copy_(out.index_select(1, buffers["last"]))

    def _head_forward_into_predicted(self, features: torch.Tensor, next_embeds: torch.Tensor, start: int) -> None:
        slots = torch.arange(start, start + features.shape[1], device=self.device)
        out = self._head(features, next_embeds, slots)
        self._predicted.copy_(out[:, -1:])

    def _head(self, features: torch.Tensor, next_embeds: torch.Tensor, slots: torch.Tensor,
              positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """features, next_embeds: [1, T, H] written at head-cache slots [T] → predicted features [1, T, H].

        RoPE positions default to the slots, the mask to causal over slots (query at p sees ≤ p)."""
        self.cache.cache_position = slots
        positions = slots if positions is None else positions
        if mask is None:
            mask = self._kv_positions <= slots.view(1, 1, -1, 1)
        return self.head(features, next_embeds, positions, self.cache, mask)

    def _catchup_body(self) -> None:
        out = self._head(self._features, self.embed(self._next_ids).to(self.dtype), self._feature_slots)
        self._predicted.copy_(out.index_select(1, self._last))

    # ---- chain ------------------------------------------------------------------------------------

    def _chain_body(self) -> None:
        predicted = self._predicted
        for step in range(self.gamma):
            index = self.head.draft_logits(self.lm_head, predicted[0, -1]).argmax(dim=-1, keepdim=True)  # [1]
            token = self.head.token_ids(index)
            self._draft[step:step + 1].copy_(token)
            if step + 1 < self.gamma:
                slot = self._observed + step  # [1]
                predicted = self._head(predicted, self.embed(token).unsqueeze(0).to(self.dtype), slot)

    # ---- tree -------------------------------------------------------------------------------------

    def _tree_buffers(self, depth: int) -> dict[str, torch.Tensor]:
        if depth not in self._trees:
            k = self.topk
            pool = k + (depth - 1) * k * k
            nodes = min(self.max_nodes, pool) + 1
            long = dict(dtype=torch.long, device=self.device)
            self._trees[depth] = {
                "pool_tokens": torch.zeros(pool, **long), "pool_scores": torch.zeros(pool, device=self.device),
                "pool_parents": torch.zeros(pool, **long), "pool_depths": torch.zeros(pool, **long),
                "tokens": torch.zeros(nodes, **long), "depths": torch.zeros(nodes, **long),
                "ancestry": torch.zeros(nodes, nodes, dtype=torch.bool, device=self.device),
                "packed": torch.zeros(2 * (nodes - 1), **long)}
        return self._trees[depth]

    def _children(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [m, H] → the top-k children per row: (token ids [m, k], log q [m, k]), likeliest first."""
        logits = self.head.draft_logits(self.lm_head, features).float()
        top = torch.log_softmax(logits, dim=-1).topk(min(self.topk, logits.shape[-1]), dim=-1)
        return self.head.token_ids(top.indices), top.values

    def _tree_body(self, depth: int, buffers: dict[str, torch.Tensor]) -> None:
        """EAGLE-2 expansion as in EagleProposer.propose_tree, with fixed shapes: the pool holds the
        root's k children, then k×k candidates per level; each level expands the best k of its own."""
        k, hidden = self.topk, self.head.config.hidden_size
        tokens, scores = self._children(self._predicted[0])  # [1, k]
        self._pool_write(buffers, 0, tokens[0], scores[0], torch.full((k,), -1, dtype=torch.long, device=self.device), 1)
        frontier = torch.arange(k, device=self.device)  # pool indices of the expanded candidates
        frontier_tokens, frontier_scores = tokens[0], scores[0]
        frontier_features = self._predicted.expand(1, k, hidden)
        slots_used = (depth - 1) * k
        ancestry = torch.zeros(k, max(slots_used, 1), dtype=torch.bool, device=self.device)  # frontier → head slots
        base = self._observed  # [1] first head slot of the tree (= the chain's first slot)
        for level in range(1, depth):
            own = (level - 1) * k + torch.arange(k, device=self.device)  # this level's slot offsets
            ancestry.index_put_((torch.arange(k, device=self.device), own), self._true)
            slots = base + own
            mask = (self._kv_positions < base).expand(1, 1, k, self._kv_positions.shape[-1]).clone()
            mask[0, 0].index_copy_(1, base + torch.arange(slots_used, device=self.device), ancestry)
            out = self._head(frontier_features, self.embed(frontier_tokens).unsqueeze(0).to(self.dtype), slots,
                             positions=(base + level - 1).expand(k), mask=mask)  # [1, k, H]
            child_tokens, log_q = self._children(out[0])  # [k, k]
            candidate_scores = (frontier_scores[:, None] + log_q).flatten()  # [k*k]
            first = k + (level - 1) * k * k
            self._pool_write(buffers, first, child_tokens.flatten(), candidate_scores,
                             frontier.repeat_interleave(k), level + 1)
            chosen = candidate_scores.topk(k).indices  # [k] best first, as EagleProposer
            rows = chosen // k
            frontier = first + chosen
            frontier_tokens, frontier_scores = child_tokens.flatten()[chosen], candidate_scores[chosen]
            frontier_features = out[:, rows]
            ancestry = ancestry[rows]
        self._select(buffers, depth)

    @staticmethod
    def _pool_write(buffers: dict[str, torch.Tensor], first: int, tokens: torch.Tensor, scores: torch.Tensor,
                    parents: torch.Tensor, depth: int) -> None:
        stop = first + tokens.shape[0]
        buffers["pool_tokens"][first:stop].copy_(tokens)
        buffers["pool_scores"][first:stop].copy_(scores)
        buffers["pool_parents"][first:stop].copy_(parents)
        buffers["pool_depths"][first:stop].fill_(depth)

    def _select(self, buffers: dict[str, torch.Tensor], depth: int) -> None:
        """The best N candidates by score. A child's score (parent's + log q ≤ 0) never beats its parent's,
        and a stable sort puts a parent (earlier in the pool) before an equal child: the set is
        ancestor-closed, as EagleProposer._select's. Nodes are kept in pool order (parents first)."""
        nodes = buffers["tokens"].shape[0] - 1
        order = torch.sort(buffers["pool_scores"], descending=True, stable=True).indices[:nodes]
        kept = order.sort().values  # [N] pool indices, parents first
        node_of = torch.zeros(buffers["pool_scores"].shape[0] + 1, dtype=torch.long, device=self.device)
        node_of[kept + 1] = torch.arange(1, nodes + 1, device=self.device)  # pool index + 1 → node (root: 0)
        parents = node_of[buffers["pool_parents"][kept] + 1]  # [N]
        buffers["tokens"][1:].copy_(buffers["pool_tokens"][kept])
        buffers["depths"][:1].zero_()
        buffers["depths"][1:].copy_(buffers["pool_depths"][kept])
        parent_of = torch.cat([torch.zeros(1, dtype=torch.long, device=self.device), parents])  # root → itself
        ancestry = buffers["ancestry"]
        ancestry.zero_()
        rows = torch.arange(nodes + 1, device=self.device)
        walk = rows
        ancestry.index_put_((rows, walk), self._true)
        for _ in range(depth):
            walk = parent_of[walk]
            ancestry.index_put_((rows, walk), self._true)
        buffers["packed"][:nodes].copy_(buffers["tokens"][1:])
        buffers["packed"][nodes:].copy_(parents)
