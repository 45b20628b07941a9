"""The captured EAGLE drafter and the static tree verify (CPU: graphs off, same code path).

- StaticEagleDrafter drafts the same chains and trees as the eager EagleProposer (float32);
- compile+eagle-tree (StaticTarget.verify_tree / keep_path) gives baseline's greedy tokens;
- an oracle tree whose true branch is not the first child makes keep_path move slots.
"""

from __future__ import annotations

import pytest
import torch

from egpt_speed.decoding import GenerationSettings
from egpt_speed.eagle import EagleHead, head_config_from_target
from egpt_speed.errors import EgptError
from egpt_speed.proposers import EagleProposer, Proposer
from egpt_speed.speculation import DynamicTarget, speculative_decode
from egpt_speed.static_decode import StaticEngine, StaticTarget
from egpt_speed.static_draft import StaticEagleDrafter
from egpt_speed.timing import Clock
from egpt_speed.tree import DraftTree, TreeShape
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")
NEW = 24


@pytest.fixture(scope="module")
def model(sp_tokenizer):
    tiny = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    with torch.no_grad():  # sharper logits: fewer near-ties, so equality tests the code, not rounding
        tiny.llm.lm_head.weight.mul_(4.0)
    return tiny


@pytest.fixture(scope="module")
def head(model):
    torch.manual_seed(0)
    return EagleHead(head_config_from_target(model.llm.config)).eval()


def prefix(model, seed: int, length: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, model.hidden_size, generator=generator) * 0.5  # [1, L, H]


def reference(model, embeds: torch.Tensor, new: int = NEW) -> list[int]:
    with torch.inference_mode():
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=new, do_sample=False, eos_token_id=None)
    return out[0].tolist()


def decode(target, embeds, proposer, gamma: int = 4, tree: TreeShape | None = None, new: int = NEW):
    clock = Clock(CPU)
    clock.begin()
    return speculative_decode(target, embeds, proposer, GenerationSettings(max_new_tokens=new), gamma, set(), clock,
                              tree=tree)


def recording(cls):
    """A proposer subclass that logs every chain (token list) or tree (tokens, parents) it drafts."""

    class Recording(cls):
        def propose(self, *args, **kwargs):
            draft = super().propose(*args, **kwargs)
            self.log.append(draft.tokens.tolist())
            return draft

        def propose_tree(self, *args, **kwargs):
            tree = super().propose_tree(*args, **kwargs)
            self.log.append((tree.tokens, tree.parents))
            return tree

    return Recording


def static_target(model, gamma: int, embeds: torch.Tensor, tree_nodes: int = 0) -> StaticTarget:
    target = StaticTarget(StaticEngine(model.llm, cuda_graph=False), gamma)
    target.setup(embeds.shape[1] + NEW, tree_nodes=tree_nodes)
    return target


@pytest.mark.parametrize("seed,gamma", [(0, 4), (1, 2), (2, 5)])
def test_captured_chain_drafts_equal_eager(model, head, seed, gamma):
    embeds = prefix(model, seed)
    eager = recording(EagleProposer)(head, model.llm, embeds)
    eager.log = []
    expected = decode(DynamicTarget(model.llm), embeds, eager, gamma).token_ids
    static = recording(StaticEagleDrafter)(head, model.llm, gamma, cuda_graph=False).begin(embeds, NEW)
    static.log = []
    got = decode(DynamicTarget(model.llm), embeds, static, gamma).token_ids
    assert got == expected == reference(model, embeds)
    assert len(static.log) > 3 and static.log == eager.log


@pytest.mark.parametrize("seed,topk,nodes", [(0, 4, 10), (3, 8, 32)])
def test_captured_tree_drafts_equal_eager(model, head, seed, topk, nodes):
    embeds, shape = prefix(model, seed), TreeShape(topk=topk, max_nodes=nodes)
    eager = recording(EagleProposer)(head, model.llm, embeds)
    eager.log = []
    decode(DynamicTarget(model.llm), embeds, eager, 4, shape)
    static = recording(StaticEagleDrafter)(head, model.llm, 4, topk, nodes, cuda_graph=False).begin(embeds, NEW)
    static.log = []
    decode(DynamicTarget(model.llm), embeds, static, 4, shape)
    assert len(static.log) > 3 and static.log == eager.log


@pytest.mark.parametrize("seed,gamma,topk,nodes", [(0, 4, 8, 32), (4, 3, 4, 10)])
def test_static_tree_verify_equals_baseline(model, head, seed, gamma, topk, nodes):
    embeds = prefix(model, seed)
    drafter = StaticEagleDrafter(head, model.llm, gamma, topk, nodes, cuda_graph=False).begin(embeds, NEW)
    result = decode(static_target(model, gamma, embeds, nodes), embeds, drafter, gamma, TreeShape(topk, nodes))
    assert result.token_ids == reference(model, embeds)


class OracleTree(Proposer):
    """Knows the answer: each tree's first root child is wrong (with a child of its own), the true
    continuation hangs off the second, so every accepted path sits at non-contiguous node offsets."""

    def __init__(self, answer: list[int], vocab: int):
        self.answer, self.vocab = answer, vocab

    def propose_tree(self, committed, depth, topk, max_nodes, settings=None, generator=None) -> DraftTree:
        truth = self.answer[len(committed):len(committed) + depth]
        wrong = (truth[0] + 1) % self.vocab if truth else 0
        tokens, parents = [committed[-1], wrong, wrong], [-1, 0, 1]
        for index, token in enumerate(truth):
            tokens.append(token)
            parents.append(0 if index == 0 else len(tokens) - 2)
        return DraftTree(tokens, parents)


def test_keep_path_compacts_accepted_branch(model):
    embeds = prefix(model, 5)
    answer = reference(model, embeds)
    oracle = OracleTree(answer, model.llm.config.vocab_size)
    result = decode(static_target(model, 4, embeds, 8), embeds, oracle, 4, TreeShape(topk=2, max_nodes=8))
    assert result.token_ids == answer
    assert result.metrics["target_forwards"] <= 1 + -(-(NEW - 1) // 5)  # every step accepts the whole branch


def test_static_tree_logits_equal_dynamic(model):
    embeds = prefix(model, 6)
    tree = DraftTree([5, 7, 9, 11, 13], [-1, 0, 0, 1, 3])
    dynamic, static = DynamicTarget(model.llm), static_target(model, 4, embeds, 8)
    dynamic.prefill(embeds)
    static.prefill(embeds)
    torch.testing.assert_close(static.verify_tree(tree), dynamic.verify_tree(tree), rtol=1e-5, atol=1e-5)


def decode_through_registry(model, head_dir, names: tuple[str, ...], options: dict, seed: int) -> tuple[dict, object]:
    """One event prompt decoded by each named strategy built from the registry → ({name: result}, the last strategy)."""
    from egpt_speed.decoding import DecodeRequest
    from egpt_speed.prompt import EVENT_TOKEN_INDEX
    from egpt_speed.strategies import registry
    from egpt_speed.strategies.registry import RunContext

    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, model.llm.config.vocab_size, (8,), generator=generator)
    prompt = torch.cat([torch.tensor([1]), text[:4], torch.tensor([EVENT_TOKEN_INDEX]), text[4:]])
    request = DecodeRequest("s", prompt, torch.randn(5, model.hidden_size, generator=generator) * 0.5,
                            GenerationSettings(max_new_tokens=NEW))
    results = {}
    for name in names:
        strategy = registry.build(name, RunContext(device=CPU, dtype=torch.float32, draft_spec=str(head_dir), options=options))
        strategy.prepare(model)
        clock = Clock(CPU)
        clock.begin()
        results[name] = strategy.decode(model, request, clock)
    return results, strategy


@pytest.mark.parametrize("name,draft_compile", [("compile+eagle", None), ("compile+eagle-tree", None),
                                                 ("compile+eagle-tree", "default")])
def test_compile_eagle_strategies_equal_baseline(model, head, tmp_path, name, draft_compile):
    """The registry path: compile lends its StaticTarget and the captured drafter (Compile.lend_drafter),
    whose bodies --draft-compile hands to inductor."""
    head.save(tmp_path / "head")
    results, strategy = decode_through_registry(model, tmp_path / "head", ("baseline", name),
                                                {"tree_nodes": 10, "draft_compile": draft_compile}, seed=7)
    assert results[name].token_ids == results["baseline"].token_ids
    assert results[name].metrics["drafted"] > 0
    lender = next(part for part in strategy.parts if part.lends_target)
    assert isinstance(lender._drafter, StaticEagleDrafter)  # the captured drafter, not the eager head
    assert lender._drafter.graphs.compile_mode == draft_compile and lender.settings()["draft_compile"] == draft_compile
    assert results[name].metrics["drafter"] == "StaticEagleDrafter"  # and the sample says so


@pytest.mark.parametrize("tree", [None, TreeShape(topk=4, max_nodes=10)])
def test_inductor_compiled_draft_bodies_draft_what_the_eager_ones_draft(model, head, tree):
    """--draft-compile: every drafter body (catch-up, chain, each tree depth) traces as one graph
    (fullgraph) and, compiled by inductor, drafts the eager bodies' chains / trees (float32)."""
    torch._dynamo.reset()
    embeds = prefix(model, 9)
    logs = {}
    for mode in (None, "default"):
        drafter = recording(StaticEagleDrafter)(head, model.llm, 4, 4, 10, cuda_graph=False, compile_mode=mode)
        drafter.log = []
        result = decode(DynamicTarget(model.llm), embeds, drafter.begin(embeds, NEW), 4, tree)
        assert result.token_ids == reference(model, embeds)
        logs[mode] = drafter.log
    assert len(logs[None]) > 3 and logs["default"] == logs[None]


@pytest.fixture(scope="module")
def eagle3_head(model):
    """A random EAGLE-3 head over target layers 0, 1, 1 (the tiny target has two) and a 60-id draft vocabulary."""
    from egpt_speed.eagle_formats import Eagle3Head

    torch.manual_seed(5)
    head = Eagle3Head(head_config_from_target(model.llm.config), [0, 1, 1], 60, model.hidden_size)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, 0.2)
        head.draft_vocab.copy_(torch.arange(60) * 2)
    return head.eval()


@pytest.mark.parametrize("seed,tree", [(0, None), (1, TreeShape(topk=4, max_nodes=10))])
def test_an_eagle3_head_drafts_the_same_on_the_static_target(model, eagle3_head, seed, tree):
    """The captured drafter on the static target (capture_layers: the three layers' inputs from the static
    forward) drafts every chain / tree the eager EagleProposer drafts on the dynamic target (hooks)."""
    embeds = prefix(model, seed)
    eager = recording(EagleProposer)(eagle3_head, model.llm, embeds)
    eager.log = []
    expected = decode(DynamicTarget(model.llm, eager.aux_layers), embeds, eager, 4, tree).token_ids
    nodes = tree.max_nodes if tree else 0
    static = recording(StaticEagleDrafter)(eagle3_head, model.llm, 4, 4, max(nodes, 10), cuda_graph=False).begin(embeds, NEW)
    static.log = []
    target = static_target(model, 4, embeds, nodes)
    target.capture_layers(static.aux_layers)
    assert decode(target, embeds, static, 4, tree).token_ids == expected == reference(model, embeds)
    assert len(static.log) > 3 and static.log == eager.log


def test_the_captured_drafter_refuses_features_of_the_wrong_width(model, eagle3_head):
    drafter = StaticEagleDrafter(eagle3_head, model.llm, 4, cuda_graph=False).begin(prefix(model, 2), NEW)
    wide = 3 * model.hidden_size
    with pytest.raises(EgptError, match=rf"width {wide} \(target layers \[0, 1, 1\]\).*passed width {model.hidden_size}"):
        drafter.observe(torch.zeros(1, 3, model.hidden_size))


def test_pending_tree_reads_back_lazily_and_before_the_next_draft(model, head):
    """propose_tree returns without reading the tree back; an unread tree is saved before the next one
    overwrites the drafter's buffers, and equals what an immediate read gives."""
    from egpt_speed.static_draft import PendingTree

    embeds, nodes = prefix(model, 8), 10
    trees = {}
    for lazy in (True, False):
        drafter = StaticEagleDrafter(head, model.llm, 3, 4, nodes, cuda_graph=False).begin(embeds, NEW)
        drafter.observe(torch.randn(1, embeds.shape[1], model.hidden_size, generator=torch.Generator().manual_seed(1)))
        committed = [5]
        first = drafter.propose_tree(committed, 3, 4, nodes)
        assert isinstance(first, PendingTree) and first.size == nodes and first._host is None
        if not lazy:
            first.materialize()
        drafter.observe(torch.randn(1, 2, model.hidden_size, generator=torch.Generator().manual_seed(2)))
        committed += [first.device_inputs[0][1].item(), 9]
        second = drafter.propose_tree(committed, 3, 4, nodes)
        assert first._host is not None  # read back before the second draft overwrote the buffers
        trees[lazy] = [(tree.tokens, tree.parents) for tree in (first, second)]
        for tree in (first, second):
            DraftTree(tree.tokens, tree.parents)  # a valid tree: one parent per node, parents first
            assert len(tree.tokens) == nodes + 1
    assert trees[True] == trees[False]
    assert trees[True][0] != trees[True][1]


# ---- one graph per step (fused_step.py) ---------------------------------------------------------------


def oracle_drafter(model, head, gamma: int, embeds: torch.Tensor, answer: list[int]) -> StaticEagleDrafter:
    """The captured drafter, drafting from the known answer instead of its head (every 4th position wrong),
    so both loops see real acceptance lengths 0..γ; its head still reads every accepted feature."""
    vocab = model.llm.config.vocab_size

    class Oracle(StaticEagleDrafter):
        def _chain_body(self) -> None:
            offsets = self._observed + 1 + torch.arange(self.gamma)  # target positions of the drafts
            truth = self._answer.index_select(0, offsets - self.prefix_len)
            self._draft.copy_(torch.where(offsets % 4 == 2, (truth + 1) % vocab, truth))

    drafter = Oracle(head, model.llm, gamma, cuda_graph=False)
    drafter._answer = torch.tensor(answer + [0] * (gamma + 2))
    return drafter.begin(embeds, NEW)


@pytest.mark.parametrize("seed,gamma", [(0, 4), (3, 2), (5, 5)])
def test_the_fused_step_decodes_what_the_unfused_loop_decodes(model, head, seed, gamma):
    from egpt_speed.fused_step import fused_chain_decode

    embeds = prefix(model, seed)
    answer = reference(model, embeds, NEW + gamma + 1)
    unfused = decode(static_target(model, gamma, embeds), embeds, oracle_drafter(model, head, gamma, embeds, answer), gamma)
    clock = Clock(CPU)
    clock.begin()
    fused = fused_chain_decode(static_target(model, gamma, embeds), oracle_drafter(model, head, gamma, embeds, answer),
                               embeds, GenerationSettings(max_new_tokens=NEW), gamma, set(), clock)
    assert fused.token_ids == unfused.token_ids == answer[:NEW]
    for key in ("target_forwards", "accepted", "accepted_by_position", "drafted_by_position"):
        assert fused.metrics[key] == unfused.metrics[key], key
    assert 0 < fused.metrics["accepted"] < fused.metrics["drafted"]  # partial acceptance was exercised


def test_the_fused_step_stops_at_a_stop_id_inside_an_accepted_run(model, head):
    from egpt_speed.fused_step import fused_chain_decode

    embeds = prefix(model, 1)
    answer = reference(model, embeds, NEW + 6)
    stop = answer[7]
    clock = Clock(CPU)
    clock.begin()
    result = fused_chain_decode(static_target(model, 4, embeds), oracle_drafter(model, head, 4, embeds, answer), embeds,
                                GenerationSettings(max_new_tokens=NEW), 4, {stop}, clock)
    assert result.token_ids == answer[:answer.index(stop) + 1]


@pytest.mark.parametrize("new,tree", [(NEW, False), (2, False), (NEW, True)])
def test_the_compiled_fused_step_survives_its_warm_up_runs(model, head, new, tree):
    """Compilation runs the body before the first real step: the sample's state is put back afterwards,
    and the caches have room for those runs past a short sample's end."""
    from egpt_speed.fused_step import fused_chain_decode

    torch._dynamo.reset()
    embeds = prefix(model, 2)
    answer = reference(model, embeds, NEW + 5)
    target = StaticTarget(StaticEngine(model.llm, cuda_graph=False, compile_mode="default"), 4)
    target.setup(embeds.shape[1] + new, tree_nodes=8 if tree else 0)
    drafter = (oracle_tree_drafter if tree else oracle_drafter)(model, head, 4, embeds, answer)
    drafter.setup(embeds.shape[1] + new)
    clock = Clock(CPU)
    clock.begin()
    result = fused_chain_decode(target, drafter, embeds, GenerationSettings(max_new_tokens=new), 4, set(), clock, tree=tree)
    assert result.token_ids == answer[:new] and (result.metrics["accepted"] > 0 or new < 3)


@pytest.mark.parametrize("name", ["compile+eagle", "compile+eagle-tree"])
def test_compile_eagle_with_fused_step_equals_baseline(model, eagle3_head, tmp_path, name):
    """The registry path with an EAGLE-3 head: --fused-step takes the fused loop, outputs equal baseline's."""
    from egpt_speed.eagle_formats import export_eagle3

    export_eagle3(eagle3_head, tmp_path / "head")
    results, strategy = decode_through_registry(model, tmp_path / "head", ("baseline", name),
                                                {"fused_step": True, "tree_nodes": 10}, seed=4)
    assert results[name].token_ids == results["baseline"].token_ids
    assert results[name].metrics["fused_step"] is True and strategy.settings()["fused_step"] is True


def oracle_tree_drafter(model, head, gamma: int, embeds: torch.Tensor, answer: list[int]) -> StaticEagleDrafter:
    """The captured drafter with a known-answer tree: per level a wrong first child, then the true token (every
    4th one wrong too), so a kept path sits at non-contiguous nodes 2, 4, .. and the cache must be compacted."""
    vocab, nodes = model.llm.config.vocab_size, 2 * gamma

    class OracleTree(StaticEagleDrafter):
        def _tree_body(self, depth: int, buffers: dict[str, torch.Tensor]) -> None:
            levels = torch.arange(1, depth + 1)
            offsets = self._observed + levels  # target positions of each level's tokens
            truth = self._answer.index_select(0, offsets - self.prefix_len)
            true_tokens = torch.where(offsets % 4 == 2, (truth + 2) % vocab, truth)
            tokens = torch.stack([(truth + 1) % vocab, true_tokens], dim=1).flatten()  # nodes 1..2·depth
            parents = (2 * (levels - 1)).repeat_interleave(2)  # both children of the previous true node
            buffers["tokens"][1:].copy_(tokens)
            buffers["depths"][1:].copy_(levels.repeat_interleave(2))
            buffers["packed"][:nodes].copy_(tokens)
            buffers["packed"][nodes:].copy_(parents)
            node = torch.arange(nodes + 1)
            below = torch.cat([torch.ones(1, dtype=torch.long), 2 * levels.repeat_interleave(2)])  # row i: ancestors < this
            ancestors = (node % 2 == 0).unsqueeze(0) & (node.unsqueeze(0) < below.unsqueeze(1))  # the true nodes above
            buffers["ancestry"].copy_(ancestors | torch.eye(nodes + 1, dtype=torch.bool))

    drafter = OracleTree(head, model.llm, gamma, 4, nodes, cuda_graph=False)
    drafter._answer = torch.tensor(answer + [0] * (gamma + 2))
    return drafter.begin(embeds, NEW)


@pytest.mark.parametrize("seed,gamma", [(0, 4), (6, 3)])
def test_the_fused_tree_step_keeps_non_contiguous_paths_and_decodes_the_answer(model, head, seed, gamma):
    from egpt_speed.fused_step import fused_chain_decode

    embeds = prefix(model, seed)
    answer = reference(model, embeds, NEW + gamma + 1)
    target = static_target(model, gamma, embeds, 2 * gamma)
    clock = Clock(CPU)
    clock.begin()
    result = fused_chain_decode(target, oracle_tree_drafter(model, head, gamma, embeds, answer), embeds,
                                GenerationSettings(max_new_tokens=NEW), gamma, set(), clock, tree=True)
    assert result.token_ids == answer[:NEW]
    assert result.metrics["accepted"] > NEW // 3 and result.metrics["target_forwards"] < NEW  # paths were kept
    assert result.metrics["tree"]["mean_nodes"] == 2 * gamma


def test_the_fused_step_is_rebuilt_when_a_longer_prompt_reallocates_the_caches(model, head):
    """One target and drafter across samples (as compile+eagle reuses them): a prompt past the caches'
    rounded size re-allocates both, and the next step graph must use the new buffers, not the old."""
    from egpt_speed.fused_step import fused_chain_decode

    short, long = prefix(model, 3), prefix(model, 4, length=300)
    target = static_target(model, 4, short)
    drafter = None
    steps = []
    for embeds in (short, long, short):
        answer = reference(model, embeds, NEW + 6)
        if drafter is None:
            drafter = oracle_drafter(model, head, 4, embeds, answer)
        else:
            drafter._answer = torch.tensor(answer + [0] * 6)
            drafter.begin(embeds, NEW)
        clock = Clock(CPU)
        clock.begin()
        result = fused_chain_decode(target, drafter, embeds, GenerationSettings(max_new_tokens=NEW), 4, set(), clock)
        assert result.token_ids == answer[:NEW] and result.metrics["accepted"] > 0
        steps.append(drafter._fused)
    assert steps[1] is not steps[0] and steps[2] is steps[1]  # rebuilt once, for the re-allocation only


def test_targets_sharing_an_engine_survive_a_reallocation_by_either(model, head):
    """spec_tree_sweep runs several targets on one engine: when one target re-allocates the cache (here a fused
    tree step's room for a long prompt, the sweep's crash on the H200), the others must rebuild their verify,
    tree and keep_path graphs on the new cache instead of replaying (or missing) the old ones, and two targets
    must not share a graph; a replaced target's graphs can be discarded."""
    from egpt_speed.fused_step import fused_chain_decode

    short, long = prefix(model, 5), prefix(model, 6, length=300)
    engine = StaticEngine(model.llm, cuda_graph=False)
    trees, other = StaticTarget(engine, 4), StaticTarget(engine, 4)
    trees.setup(short.shape[1] + NEW, tree_nodes=8)
    other.setup(short.shape[1] + NEW, tree_nodes=8)
    for target, embeds in ((trees, short), (other, long), (trees, short), (other, short), (trees, long)):
        answer = reference(model, embeds)
        if target is other:  # the neighbour: a fused tree step, which sets up its own (larger) room
            clock = Clock(CPU)
            clock.begin()
            drafter = oracle_tree_drafter(model, head, 4, embeds, reference(model, embeds, NEW + 5))
            result = fused_chain_decode(other, drafter, embeds, GenerationSettings(max_new_tokens=NEW), 4, set(), clock,
                                        tree=True)
        else:
            result = decode(trees, embeds, OracleTree(answer, model.llm.config.vocab_size), 4, TreeShape(topk=2, max_nodes=8))
            assert trees._step_name("keep") in engine._steps  # the kept paths were moved, by this target's graph
        assert result.token_ids == answer
    assert engine.allocations == 2  # the long prompt re-allocated once; `trees` followed without a setup of its own
    trees.discard()
    assert engine._steps and not any(name.endswith(f"@{trees._number}") for name in engine._steps)


# ---- the padded prompt (PREFILL_BUCKET): the target's prefill and the head's prompt catch-up, as CUDA runs them ----

def padded_pair(model, head, gamma: int, embeds: torch.Tensor, padded: bool, tree: TreeShape | None = None):
    """A static target and a recording drafter, both padding the prompt to its bucket or both not."""
    shape = (tree.topk, tree.max_nodes) if tree else ()
    drafter = recording(StaticEagleDrafter)(head, model.llm, gamma, *shape, cuda_graph=False, bucket_prompt=padded)
    drafter.log = []
    target = StaticTarget(StaticEngine(model.llm, cuda_graph=False, prefill_graphs=padded), gamma)
    target.setup(embeds.shape[1] + NEW, tree_nodes=tree.max_nodes if tree else 0)
    return target, drafter.begin(embeds, NEW)


@pytest.mark.parametrize("seed,length,tree", [(0, 9, None), (1, 64, None), (2, 70, TreeShape(topk=4, max_nodes=10)),
                                              (3, 130, TreeShape(topk=8, max_nodes=32))])
def test_a_padded_prompt_drafts_and_decodes_what_the_unpadded_one_does(model, head, seed, length, tree):
    embeds = prefix(model, seed, length)
    runs = []
    for padded in (False, True):
        target, drafter = padded_pair(model, head, 4, embeds, padded, tree)
        runs.append((decode(target, embeds, drafter, 4, tree).token_ids, drafter.log))
        assert bool(drafter._prompts) == padded  # the padded catch-up really ran
    assert runs[1] == runs[0] and len(runs[0][1]) > 3
    assert runs[0][0] == reference(model, embeds)


@pytest.mark.parametrize("tree", [False, True])
def test_the_fused_step_after_a_padded_prompt_equals_the_unpadded_loop(model, head, tree):
    from egpt_speed.fused_step import fused_chain_decode

    embeds, gamma = prefix(model, 7, 45), 4
    shape = TreeShape(topk=8, max_nodes=32) if tree else None
    target, drafter = padded_pair(model, head, gamma, embeds, True, shape)
    clock = Clock(CPU)
    clock.begin()
    fused = fused_chain_decode(target, drafter, embeds, GenerationSettings(max_new_tokens=NEW), gamma, set(), clock,
                               tree=tree)
    assert fused.token_ids == reference(model, embeds)


def test_prompts_of_many_buckets_do_not_recompile_the_drafter(model, head):
    """--draft-compile: the prompt catch-up is captured without inductor, so ten buckets neither hit dynamo's
    recompile limit (8) nor compile inside a sample; drafts equal the uncompiled drafter's."""
    lengths = [64 * i + 5 for i in range(10, 0, -1)]  # longest first: one head cache for all
    drafts = {}
    for compile_mode in (None, "default"):
        drafter = StaticEagleDrafter(head, model.llm, 4, cuda_graph=False, compile_mode=compile_mode, bucket_prompt=True)
        drafts[compile_mode] = []
        for length in lengths:
            embeds = prefix(model, length, length)
            drafter.begin(embeds, 8)
            drafter.observe(torch.randn(1, length, drafter.feature_size, generator=torch.Generator().manual_seed(length)))
            with torch.inference_mode():
                drafts[compile_mode].append(drafter.propose([7], 4, None, None).tokens.tolist())
        assert len(drafter._prompts) == 10
    assert drafts["default"] == drafts[None]


def test_the_fused_step_is_on_by_default_only_where_it_was_measured_faster():
    """Unset: a greedy, fixed-γ compile+eagle(-tree) on CUDA fuses its step; CPU, --sample, --adaptive-gamma and
    cudagraph-tree compiles keep the loop; --fused-step / --no-fused-step always win."""
    from egpt_speed.fused_step import resolve_fused_step
    from egpt_speed.baselines.runner import RunConfig, context_for
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_fused_step(None, cuda, False, {}) is True
    assert resolve_fused_step(None, cpu, False, {}) is False
    assert resolve_fused_step(None, cuda, True, {}) is False
    assert resolve_fused_step(None, cuda, False, {"adaptive_gamma": True}) is False
    assert resolve_fused_step(None, cuda, False, {"compile_mode": "reduce-overhead"}) is False
    assert resolve_fused_step(None, cuda, False, {"draft_compile": "default"}) is False
    assert resolve_fused_step(False, cuda, False, {}) is False and resolve_fused_step(True, cpu, False, {}) is True
    from egpt_speed.baselines.checks import speculates_on_compile
    assert all(map(speculates_on_compile, ["compile+eagle", "eagle+compile", "fused+compile+eagle-tree",
                                            "compile+speculative"]))
    assert not any(map(speculates_on_compile, ["eagle", "compile", "eagle-tree+sdpa", "fused+compile"]))
    unset = RunConfig(strategies=["compile+eagle"], device="cpu")
    assert unset.options["fused_step"] is None and context_for(unset).options["fused_step"] is False
    chosen = RunConfig(strategies=["compile+eagle"], device="cpu", options={**unset.options, "fused_step": True})
    assert context_for(chosen).options["fused_step"] is True
    from egpt_speed import journal
    from egpt_speed.baselines.runner import with_resolved_options
    off = RunConfig(strategies=["compile+eagle"], device="cpu", options={**unset.options, "fused_step": False})
    assert journal.config_hash(with_resolved_options(unset).record()) == journal.config_hash(off.record()), \
        "a CPU run without the flag must resume a journal written when the flag defaulted to off"


def test_an_lm_draft_keeps_the_loop_and_says_so_when_the_fused_step_is_on(model, sp_tokenizer, tmp_path):
    """The fused step is an EAGLE-head path: compile+speculative with a causal-LM draft under fused_step=True (the CUDA
    default) decodes with the loop, equal to baseline, and its settings (which the report reads) say not fused."""
    from test_draft_lm import write_draft_lm

    write_draft_lm(tmp_path / "draft", sp_tokenizer, len(sp_tokenizer))
    results, strategy = decode_through_registry(model, tmp_path / "draft", ("baseline", "compile+speculative"),
                                                {"fused_step": True}, seed=5)
    assert results["compile+speculative"].token_ids == results["baseline"].token_ids
    assert "fused_step" not in results["compile+speculative"].metrics
    assert strategy.settings()["fused_step"] is False
