"""One graph per speculative step: `compile+eagle[-tree] --fused-step` (issue 11's "single captured step").

The unfused loop (speculation.speculative_decode on a StaticTarget with a StaticEagleDrafter) replays
a catch-up graph, a chain-draft graph and a verify graph per step, with ~15 small host-launched ops
between them and the acceptance walked on the host. Here one body does the whole greedy step on the
device, and it is compiled and captured once like the engine's decode step:

    chain draft (γ head steps from the last predicted feature)
    → verify [pending, d_1..d_γ] at positions L..L+γ on the static target
    → accept: n = the longest prefix of drafts equal to the target's argmax (cumprod of matches)
    → state: L += n + 1, pending ← argmax[n], the head's catch-up inputs ← the verify's features
    → catch-up (the head reads the n + 1 accepted features, padded to γ + 1, and predicts the next one)

and writes [n, argmax_0..argmax_γ] to a small buffer the host reads once per step. Every shape is
fixed (γ + 1); data-dependent values (L, n) are device scalars. Rejected target slots and padded head
slots hold stale values that no later query sees (both masks show slots ≤ the query's position) and
that the next step overwrites, as in the unfused path. Greedy only. FusedTreeStep does the same for EAGLE-2
trees, with the acceptance walked down the tree and the kept path compacted in the target cache.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from egpt_speed.decoding import DecodeResult, GenerationSettings
from egpt_speed.errors import EgptError
from egpt_speed.metrics import SpeculationCounters, speculation_metrics
from egpt_speed.speculation import cut_at_stop
from egpt_speed.static_decode import StaticTarget
from egpt_speed.static_draft import StaticEagleDrafter
from egpt_speed.timing import Clock

# compiling and capturing run the body this many times before the first real step; each run advances the
# sample by up to γ + 1 positions, so both caches keep that much room past the sample's end
WARM_UP_RUNS = 4
_STEP_NUMBERS = itertools.count()  # graph names: an id() can come back once its step is freed


def resolve_fused_step(choice: bool | None, device: torch.device, do_sample: bool, options: dict) -> bool:
    """--fused-step / --no-fused-step as given; unset, on where the fused step runs and was measured faster: a greedy,
    fixed-γ run on CUDA (H200, tiny bf16, captured prompt catch-up on both sides, 3 samples: the fused tree 2.01× over
    `compile` against 1.38× unfused, the fused chain 2.05× against 2.03×;
    benchmarks/results/spec_tree_sweep_h200_20261203_bf16_captured). CPU runs stay on the step-by-step loop."""
    if choice is not None:
        return bool(choice)
    return (device.type == "cuda" and not do_sample and not options.get("adaptive_gamma")
            and options.get("compile_mode") != "reduce-overhead"
            and options.get("draft_compile") in (None, "", "none"))  # the fused graph holds the drafter's bodies


class FusedChainStep:
    """The device state and the one body of a fused greedy chain step on `target` with `drafter`."""

    def __init__(self, target: StaticTarget, drafter: StaticEagleDrafter, gamma: int):
        if drafter.gamma != gamma or target.width != gamma + 1:
            raise EgptError(f"the fused step needs a drafter and a target built for gamma {gamma}.")
        if target.engine.compile_mode == "reduce-overhead":
            raise EgptError("--fused-step captures its step itself; use another --compile-mode than reduce-overhead.")
        self.target, self.drafter, self.gamma = target, drafter, gamma
        self.engine = target.engine
        long = dict(dtype=torch.long, device=self.engine.device)
        self.tokens = torch.zeros(1, gamma + 1, **long)  # [1, W] pending token, then the drafts
        self.positions = torch.zeros(gamma + 1, **long)  # [W] L .. L+γ
        self.arange = torch.arange(gamma + 1, **long)
        self.length = torch.zeros(1, **long)  # [1] L: target positions in the cache (the pending token's position)
        self.out = torch.zeros(gamma + 2, **long)  # [n, argmax_0 .. argmax_γ]
        self.name = f"fused{gamma + 1}{target._suffix}_{next(_STEP_NUMBERS)}"  # one graph per (target, drafter buffers)
        # weak: an old cache must be freeable as soon as it is replaced
        self.built_on = (weakref.ref(self.engine.cache), weakref.ref(drafter._features))

    def still_valid(self, target: StaticTarget, drafter: StaticEagleDrafter) -> bool:
        """False once either cache was re-allocated (new buffers: this step's graph reads the old ones)."""
        return (self.target is target and self.drafter is drafter and self.built_on[0]() is target.engine.cache
                and self.built_on[1]() is drafter._features)

    def discard(self) -> None:
        """Drop this step's captured graph from the engine (its memory pool goes with it)."""
        self.engine._steps.pop(self.name, None)
        self.engine._graphs.pop(self.name, None)

    def _state(self) -> list[torch.Tensor]:
        """Every buffer the body advances: restored after the warm-up runs that compile and capture it."""
        d = self.drafter
        return [self.tokens, self.length, self.out, d._features, d._next_ids, d._feature_slots, d._last, d._observed,
                d._predicted, d._draft]

    def _body(self) -> None:
        d = self.drafter
        d._chain_body()  # _predicted at _observed (= L) → _draft [γ]
        self.tokens[0, 1:].copy_(d._draft)
        torch.add(self.arange, self.length, out=self.positions)
        logits, features = self.engine._forward(self.tokens, self.positions, aux_layers=self.target.aux_layers)
        argmax = logits[0].argmax(dim=-1)  # [W]
        accepted = (d._draft == argmax[:-1]).to(torch.long).cumprod(0).sum().view(1)  # [1] n
        self._advance(accepted, features, argmax)  # positions L..L+γ are the chain's: nothing to move

    def prepare(self) -> None:
        """Compile and capture the body once (the engine's mode); its warm-up runs must not advance the sample."""
        if self.name in self.engine._steps:
            return
        if self.engine.compile_mode is not None:
            for buffer in (self.tokens, self.positions, self.arange, self.length, self.out):
                torch._dynamo.mark_static_address(buffer)
        saved = [buffer.clone() for buffer in self._state()]
        self.engine._prepare_step(self.name, self._body)
        for buffer, value in zip(self._state(), saved):
            buffer.copy_(value)

    def begin(self, length: int, pending: int) -> None:
        self.length.fill_(length)
        self.tokens[0, :1].fill_(pending)

    def run(self) -> list[int]:
        """One step → [n, the n + 1 committed tokens, padding] (one device → host read-back)."""
        self.engine._steps[self.name]()
        return self.out.tolist()

    def _advance(self, accepted: torch.Tensor, features: torch.Tensor, committed: torch.Tensor) -> None:
        """After a verify at L: features [1, γ+1, F] of positions L..L+γ as kept, committed [γ+1] the token after
        each; n = accepted → L += n + 1, the pending token, and the head's catch-up of the kept features."""
        d = self.drafter
        self.out[:1].copy_(accepted)
        self.out[1:].copy_(committed)
        d._features.copy_(features)
        d._next_ids[0].copy_(committed)
        torch.add(d._arange, self.length, out=d._feature_slots)
        d._last.copy_(accepted)
        self.length.add_(accepted + 1)
        d._observed.copy_(self.length)
        self.tokens[0, :1].copy_(committed.index_select(0, accepted))
        d._catchup_body()  # → _predicted for the next step


class FusedTreeStep(FusedChainStep):
    """The same for EAGLE-2 trees (`compile+eagle-tree --fused-step`): draft a γ-deep tree on the device, verify
    all its nodes, walk the target's argmax down the tree on the device (siblings carry distinct tokens, so
    at most one child matches per level; once none does, no later level can), move the kept path's keys to
    L..L+n in the target cache (index copies over every layer), then advance as a chain step."""

    def __init__(self, target: StaticTarget, drafter: StaticEagleDrafter, gamma: int):
        super().__init__(target, drafter, gamma)
        self.draft = drafter._tree_buffers(gamma)
        self.nodes = self.draft["tokens"].shape[0]  # drafted nodes + the root: a fixed count
        self.verify = target._tree_buffers_for(self.nodes)
        self.node_ids = torch.arange(self.nodes, device=self.engine.device)
        self.name = f"fusedtree{self.nodes}{target._suffix}_{next(_STEP_NUMBERS)}"
        layer = self.engine.cache.layers[0]
        # the kept path's keys/values pass through these: gathered and scattered in place on one tensor, a
        # compiled scatter could read slots it is writing (a fused gather) on torch versions without the guard
        self.kept_keys = torch.empty_like(layer.keys[:, :, :gamma + 1])
        self.kept_values = torch.empty_like(layer.values[:, :, :gamma + 1])

    def _state(self) -> list[torch.Tensor]:
        return super()._state() + [self.draft["tokens"], self.draft["depths"], self.draft["ancestry"], self.draft["packed"]]

    def _body(self) -> None:
        d, verify, engine = self.drafter, self.verify, self.engine
        d._tree_body(self.gamma, self.draft)
        tokens = self.draft["tokens"]
        tokens[:1].copy_(self.tokens[0, :1])  # the root: the pending token
        verify.tokens[0].copy_(tokens)
        torch.add(self.draft["depths"], self.length, out=verify.positions)
        torch.add(verify.arange, self.length, out=verify.slots)
        verify.base.copy_(self.length)
        verify.ancestry.copy_(self.draft["ancestry"])
        logits, features = verify.forward(engine, self.target.aux_layers)
        argmax = logits[0].argmax(dim=-1)  # [N+1]
        parents = torch.cat([self.node_ids[:1] - 1, self.draft["packed"][self.nodes - 1:]])  # [N+1], the root's: -1
        path = [self.node_ids[:1]]  # node per kept position: the root, then one node per accepted level
        accepted = torch.zeros(1, dtype=torch.long, device=engine.device)
        for _ in range(self.gamma):
            current = path[-1]
            match = (parents == current) & (tokens == argmax.index_select(0, current))  # [N+1], at most one
            found = match.any().view(1)
            path.append(torch.where(found, match.to(torch.long).argmax().view(1), current))
            accepted += found.to(torch.long)
        kept = torch.cat(path)  # [γ+1]; past n it repeats the last kept node (those slots are overwritten later)
        source, target_slots = kept + self.length, self.arange + self.length
        for layer in engine.cache.layers:
            torch.index_select(layer.keys, 2, source, out=self.kept_keys)
            layer.keys.index_copy_(2, target_slots, self.kept_keys)
            torch.index_select(layer.values, 2, source, out=self.kept_values)
            layer.values.index_copy_(2, target_slots, self.kept_values)
        self._advance(accepted, features.index_select(1, kept), argmax.index_select(0, kept))


@torch.inference_mode()
def fused_chain_decode(target: StaticTarget, drafter: StaticEagleDrafter, prefix_embeds: torch.Tensor,
                       settings: GenerationSettings, gamma: int, stop_ids: set[int], clock: Clock,
                       tree: bool = False) -> DecodeResult:
    """Greedy speculative decoding with one captured graph per step (chains, or EAGLE-2 trees of the drafter's
    top-k and node budget with `tree`); the same tokens as the unfused loop."""
    if settings.do_sample:
        raise EgptError("the fused speculative step is greedy; drop --do-sample or --fused-step.")
    counters = SpeculationCounters(gamma=gamma)
    room = prefix_embeds.shape[1] + settings.max_new_tokens + WARM_UP_RUNS * (gamma + 1 + (drafter.max_nodes if tree else 0))
    target.setup(room)
    drafter.setup(room)
    committed = [int(target.prefill(prefix_embeds).argmax())]
    counters.target_forwards += 1
    clock.mark_first_token()
    drafter.observe(target.last_hidden)
    drafter._catch_up(committed)  # the prompt: one captured graph per PREFILL_BUCKET on CUDA (no draft phase: see below)
    step = getattr(drafter, "_fused", None)
    kind = FusedTreeStep if tree else FusedChainStep
    if type(step) is not kind or not step.still_valid(target, drafter):
        if step is not None:
            step.discard()
        step = drafter._fused = kind(target, drafter, gamma)  # a re-allocated cache: new buffers
    step.begin(target.length, committed[-1])
    step.prepare()
    while len(committed) < settings.max_new_tokens and committed[-1] not in stop_ids:
        with clock.phase("verify"):  # draft, verify, acceptance and catch-up: one graph, not separable
            values = step.run()
        room = settings.max_new_tokens - len(committed)
        accepted, budget = values[0], min(gamma, room - 1)
        counters.draft_forwards += budget
        counters.record(budget, min(accepted, budget))  # counts the target forward too
        counters.tree_nodes += step.nodes - 1 if tree else 0
        committed += cut_at_stop(values[1:accepted + 2], stop_ids, room)
    target.length = target.engine.cache.length = prefix_embeds.shape[1] + len(committed) - 1  # the host's view
    # draft and verify share one graph: no draft time of their own, so no cost ratio (None), only the step's
    metrics = speculation_metrics(counters, len(committed), 0.0, clock.phases_ms.get("verify", 0.0))
    metrics["fused_step"] = True
    if tree:
        metrics["tree"] = {"topk": drafter.topk, "max_nodes": drafter.max_nodes, "depth": gamma,
                           "mean_nodes": step.nodes - 1}
    return DecodeResult(committed, metrics)

