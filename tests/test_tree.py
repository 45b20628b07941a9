"""Tree drafting (eagle-tree): one tree-verify forward equals sequential forwards per branch, the cache
keeps exactly the accepted path, and greedy tree speculation equals greedy decoding in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from egpt_speed.decoding import GenerationSettings, with_cache
from egpt_speed.eagle import EagleHead, draft_vocabulary, head_config_from_target
from egpt_speed.proposers import EagleProposer
from egpt_speed.speculation import DynamicTarget, speculative_decode
from egpt_speed.timing import Clock
from egpt_speed.tree import (DraftTree, TreeShape, pool_tree_mask, sampling_branching, select_tree, tree_attention_mask,
                             tree_position_ids)
from egpt_speed.verify import greedy_tree_accept, sample_tree_accept

CPU = torch.device("cpu")
# root 0 → 1, 2 ; 1 → 3, 4 ; 2 → 5 ; 4 → 6   (tokens chosen so siblings differ)
BRANCHY = DraftTree(tokens=[7, 11, 12, 21, 22, 23, 31], parents=[-1, 0, 0, 1, 1, 2, 4])


def tiny_llm(seed: int = 0, layers: int = 2, vocab: int = 64) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def prefilled(llm, length: int = 9, seed: int = 1) -> tuple[DynamicTarget, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, llm.config.hidden_size, generator=generator) * 0.5
    target = DynamicTarget(llm)
    with torch.inference_mode():
        target.prefill(embeds)
    return target, embeds


def path_to(tree: DraftTree, node: int) -> list[int]:
    nodes = []
    while node != -1:
        nodes.append(node)
        node = tree.parents[node]
    return nodes[::-1]


def test_tree_structure_and_validation():
    assert BRANCHY.size == 6
    assert BRANCHY.depths() == [0, 1, 1, 2, 2, 2, 3]
    ancestry = BRANCHY.ancestry()
    assert ancestry[6].nonzero().flatten().tolist() == [0, 1, 4, 6]
    assert ancestry[5].nonzero().flatten().tolist() == [0, 2, 5]
    with pytest.raises(ValueError):
        DraftTree([1, 2], [-1, 1])  # a node cannot be its own parent
    with pytest.raises(ValueError):
        DraftTree([1, 2], [0, -1])  # node 0 must be the root


def test_tree_mask_and_positions():
    mask = tree_attention_mask(BRANCHY, 3, torch.float32, CPU)[0, 0]
    assert mask.shape == (7, 10)
    allowed = (mask == 0).int().tolist()
    assert allowed[0] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert allowed[5] == [1, 1, 1, 1, 0, 1, 0, 0, 1, 0]
    assert allowed[6] == [1, 1, 1, 1, 1, 0, 0, 1, 0, 1]
    assert tree_position_ids(BRANCHY, 3, CPU).tolist() == [[3, 4, 4, 5, 5, 5, 6]]


def test_one_tree_forward_equals_sequential_forwards_per_branch():
    llm = tiny_llm()
    target, _ = prefilled(llm)
    reference_cache = copy.deepcopy(target.cache)
    with torch.inference_mode():
        tree_logits = target.verify_tree(BRANCHY)  # [7, V]
        for node in range(len(BRANCHY.tokens)):
            cache = copy.deepcopy(reference_cache)
            ids = torch.tensor([[BRANCHY.tokens[n] for n in path_to(BRANCHY, node)]])
            sequential = llm(**with_cache(cache, input_ids=ids)).logits[0, -1]
            torch.testing.assert_close(tree_logits[node], sequential, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", [[], [2], [1, 4, 6], [2, 5]])
def test_kept_cache_equals_the_cache_of_the_accepted_path(path):
    llm = tiny_llm()
    target, _ = prefilled(llm)
    sequential_cache = copy.deepcopy(target.cache)
    base = target.cache.get_seq_length()
    with torch.inference_mode():
        target.verify_tree(BRANCHY)
        target.keep_path([0] + path)
        ids = torch.tensor([[BRANCHY.tokens[n] for n in [0] + path]])
        llm(**with_cache(sequential_cache, input_ids=ids))
    assert target.cache.get_seq_length() == base + 1 + len(path)
    for kept, expected in zip(target.cache.layers, sequential_cache.layers):
        torch.testing.assert_close(kept.keys, expected.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kept.values, expected.values, atol=1e-5, rtol=1e-4)


def test_greedy_tree_accept_walks_the_matching_branch():
    # target argmax after each node: root→12 (node 2), node 2→23 (node 5), node 5→99 (no child: bonus)
    argmax = [12, 0, 23, 0, 0, 99, 0]
    assert greedy_tree_accept(BRANCHY, argmax) == ([2, 5], 99)
    assert greedy_tree_accept(BRANCHY, [5, 0, 0, 0, 0, 0, 0]) == ([], 5)
    assert greedy_tree_accept(BRANCHY, [11, 22, 0, 0, 31, 0, 8]) == ([1, 4, 6], 8)


def test_selected_tree_is_ancestor_closed_and_bounded():
    tokens = [5, 6, 7, 8, 9, 10]
    scores = [-0.1, -0.5, -0.2, -0.3, -0.9, -0.25]
    parents = [-1, -1, 0, 0, 1, 2]
    tree = select_tree(1, tokens, scores, parents, max_nodes=4)
    assert tree.size == 4
    kept = set(tree.tokens[1:])
    assert kept == {5, 7, 8, 10}  # 10's parent 7 kept; 6 (−0.5) loses to deeper but likelier nodes
    for node in range(1, len(tree.tokens)):
        assert tree.parents[node] < node


def init_head(llm) -> EagleHead:
    """An untrained head set up as train-draft starts it (target's last layer, fc = identity on features)."""
    head = EagleHead(head_config_from_target(llm.config))
    with torch.no_grad():
        head.layer.load_state_dict(llm.model.layers[-1].state_dict())
        hidden = llm.config.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden].copy_(torch.eye(hidden))
        head.fc.bias.zero_()
    return head.eval()


@pytest.mark.parametrize("depth,topk,nodes", [(1, 2, 2), (3, 4, 10), (5, 3, 24)])
def test_eagle_tree_greedy_fp32_equals_greedy_decoding(depth, topk, nodes):
    llm = tiny_llm(seed=3, vocab=32)  # a small vocabulary so the head's top-k often holds the target's token
    _, embeds = prefilled(llm, length=12, seed=4)
    with torch.inference_mode():
        reference = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=40, do_sample=False, eos_token_id=None)[0].tolist()
    clock = Clock(CPU)
    clock.begin()
    result = speculative_decode(DynamicTarget(llm), embeds, EagleProposer(init_head(llm), llm, embeds), GenerationSettings(max_new_tokens=40),
                                depth, set(), clock, tree=TreeShape(topk=topk, max_nodes=nodes))
    assert result.token_ids == reference
    assert result.metrics["accepted"] > 0
    assert 0 < result.metrics["tree"]["mean_nodes"] <= nodes
    assert result.metrics["target_forwards"] < len(reference)


def test_tree_beats_chain_on_tokens_per_forward():
    llm = tiny_llm(seed=3, vocab=32)
    _, embeds = prefilled(llm, length=12, seed=4)
    head = init_head(llm)
    settings = GenerationSettings(max_new_tokens=48)
    runs = {}
    for name, tree in {"chain": None, "tree": TreeShape(topk=4, max_nodes=16)}.items():
        clock = Clock(CPU)
        clock.begin()
        runs[name] = speculative_decode(DynamicTarget(llm), embeds, EagleProposer(head, llm, embeds), settings, 4, set(), clock, tree=tree)
    assert runs["tree"].token_ids == runs["chain"].token_ids
    assert runs["tree"].metrics["mean_accepted_tokens"] > runs["chain"].metrics["mean_accepted_tokens"]


def test_tree_cache_stays_consistent_with_eos_inside_an_accepted_path():
    llm = tiny_llm(seed=3, vocab=32)
    _, embeds = prefilled(llm, length=12, seed=4)
    with torch.inference_mode():
        reference = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=30, do_sample=False, eos_token_id=None)[0].tolist()
    stop = reference[7]
    expected = reference[:reference.index(stop) + 1]
    clock = Clock(CPU)
    clock.begin()
    result = speculative_decode(DynamicTarget(llm), embeds, EagleProposer(init_head(llm), llm, embeds), GenerationSettings(max_new_tokens=30),
                                4, {stop}, clock, tree=TreeShape(topk=4, max_nodes=16))
    assert result.token_ids == expected


def test_head_tree_mask_blocks_siblings():
    parents = [-1, -1, 0, 1]
    slots = {0: 0, 1: 1, 2: 2, 3: 3}
    mask = pool_tree_mask([2, 3], parents, slots, 2, torch.float32, CPU)[0, 0]
    assert (mask == 0).int().tolist() == [[1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1]]


def test_draft_vocabulary_keeps_the_most_frequent_ids_and_the_forced_ones():
    labels = [torch.tensor([5, 5, 5, 9, 9, 3]), torch.tensor([9, 1])]
    assert draft_vocabulary(labels, 2, always=[0]).tolist() == [0, 5, 9]


@pytest.mark.parametrize("tree", [None, TreeShape(topk=4, max_nodes=12)])
def test_a_draft_vocabulary_keeps_speculation_lossless(tree, tmp_path):
    llm = tiny_llm(seed=3, vocab=32)
    _, embeds = prefilled(llm, length=12, seed=4)
    with torch.inference_mode():
        reference = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=30, do_sample=False, eos_token_id=None)[0].tolist()
    head = init_head(llm)
    head.draft_vocab = draft_vocabulary([torch.tensor(reference)], 6, always=[])
    head.save(tmp_path / "head")
    loaded = EagleHead.load(tmp_path / "head", CPU, torch.float32)
    assert loaded.draft_vocab.tolist() == head.draft_vocab.tolist()
    clock = Clock(CPU)
    clock.begin()
    result = speculative_decode(DynamicTarget(llm), embeds, EagleProposer(loaded, llm, embeds), GenerationSettings(max_new_tokens=30),
                                4, set(), clock, tree=tree)
    assert result.token_ids == reference
    assert result.metrics["accepted"] > 0


def test_sampled_drafts_from_a_draft_vocabulary_carry_their_full_distribution():
    llm = tiny_llm(seed=3, vocab=32)
    _, embeds = prefilled(llm, length=12, seed=4)
    head = init_head(llm)
    head.draft_vocab = torch.tensor([2, 5, 7, 11])
    proposer = EagleProposer(head, llm, embeds)
    with torch.inference_mode():
        target = DynamicTarget(llm)
        target.prefill(embeds)
        proposer.observe(target.last_hidden)
        draft = proposer.propose([3], 3, GenerationSettings(do_sample=True, temperature=1.0),
                                 torch.Generator().manual_seed(0))
    tokens, p_draft = draft.tokens, draft.p_draft
    assert set(tokens.tolist()) <= {2, 5, 7, 11}
    assert p_draft.shape == (3, 32)
    torch.testing.assert_close(p_draft.sum(-1), torch.ones(3))
    outside = torch.ones(32, dtype=torch.bool)
    outside[[2, 5, 7, 11]] = False
    assert float(p_draft[:, outside].abs().sum()) == 0.0
    for row, token in enumerate(tokens.tolist()):
        assert p_draft[row, token] > 0


def test_speculation_summary_predicts_from_measured_tokens_per_forward():
    from egpt_speed.metrics import predicted_speedup, speculation_summary

    samples = [{"drafted": 8, "accepted": 6, "target_forwards": 3, "num_tokens": 9, "gamma": 4, "cost_ratio": 0.05,
                "accepted_by_position": [2, 2, 1, 1], "drafted_by_position": [2, 2, 2, 2]}]
    summary = speculation_summary(samples)
    assert summary["mean_accepted_tokens"] == pytest.approx(1 + 6 / 2)  # 2 verify steps: prefill excluded
    assert summary["tokens_per_target_forward"] == pytest.approx(9 / 3)
    assert summary["acceptance_by_position"] == [1.0, 1.0, 0.5, 0.5]
    assert summary["predicted_speedup"] == pytest.approx(predicted_speedup(0.75, 4, 0.05))
    assert summary["predicted_speedup_measured_e"] == pytest.approx(4.0 / 1.2)


def test_eagle_tree_refuses_what_cannot_carry_its_tree_mask():
    from egpt_speed.errors import EgptError
    from egpt_speed.strategies import registry
    from egpt_speed.strategies.registry import RunContext

    context = RunContext(device=CPU, dtype=torch.float32, draft_spec=None)
    with pytest.raises(EgptError, match="hf-assisted cannot run on compile's static-cache target.*eagle-tree"):
        registry.build("compile+hf-assisted", context)
    with pytest.raises(EgptError, match="--tree-topk"):
        registry.build("eagle-tree", RunContext(device=CPU, dtype=torch.float32, options={"tree_topk": 0})).tree_shape()


def test_tree_rejection_sampling_reproduces_the_target_distribution_over_two_tokens():
    """Children drawn without replacement (3 at the root, 2 under each), whatever the draft: the first two
    emitted tokens follow p(x1)·p(x2 | x1) exactly (chi-square over 16 cells, 15 dof, p = 0.001)."""
    vocab, trials = 4, 20000
    generator = torch.Generator().manual_seed(7)
    p_first = torch.tensor([0.4, 0.3, 0.2, 0.1])
    p_second = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.05, 0.05, 0.1, 0.8]])
    q_first = torch.tensor([0.1, 0.2, 0.3, 0.4])  # deliberately unlike the target
    q_second = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.6, 0.2, 0.1, 0.1]])
    counts = torch.zeros(vocab, vocab)
    for _ in range(trials):
        tokens, parents, probs, rows = [0], [-1], {0: q_first}, [p_first]
        for x1 in torch.multinomial(q_first, 3, replacement=False, generator=generator).tolist():
            node = len(tokens)
            tokens.append(x1), parents.append(0), rows.append(p_second[x1])
            probs[node] = q_second[x1]
            for x2 in torch.multinomial(q_second[x1], 2, replacement=False, generator=generator).tolist():
                tokens.append(x2), parents.append(node), rows.append(torch.ones(vocab) / vocab)
        tree = DraftTree(tokens, parents, probs)
        path, bonus = sample_tree_accept(tree, torch.stack(rows), generator)
        emitted = [tree.tokens[n] for n in path] + [bonus]
        if len(emitted) == 1:  # x1 was the bonus: draw x2 as the target would, from its row
            emitted.append(int(torch.multinomial(p_second[emitted[0]], 1, generator=generator)))
        counts[emitted[0], emitted[1]] += 1
    expected = (p_first[:, None] * p_second) * trials
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 37.7, f"chi-square {chi_square:.1f}: tree sampling is biased"


def test_selection_keeps_a_prefix_of_each_nodes_children_in_draw_order():
    # root's children drawn in the order 5, 6, 7; the last drawn is the likeliest
    tokens, scores, parents = [5, 6, 7], [-2.0, -1.5, -0.1], [-1, -1, -1]
    tree = select_tree(1, tokens, scores, parents, max_nodes=1)
    assert tree.tokens == [1, 5]  # 7 must wait for 5 and 6
    tree = select_tree(1, tokens, scores, parents, max_nodes=3)
    assert tree.tokens == [1, 5, 6, 7]


@pytest.mark.parametrize("vocabulary", [None, [1, 2, 3, 5, 8, 13, 21, 30, 31]])
def test_sampled_eagle_tree_is_seeded_repeatable_and_accepts(vocabulary):
    llm = tiny_llm(seed=3, vocab=32)
    _, embeds = prefilled(llm, length=12, seed=4)
    head = init_head(llm)
    head.draft_vocab = torch.tensor(vocabulary) if vocabulary else None
    settings = GenerationSettings(max_new_tokens=40, do_sample=True, temperature=0.7, seed=11)
    runs = []
    for _ in range(2):
        clock = Clock(CPU)
        clock.begin()
        runs.append(speculative_decode(DynamicTarget(llm), embeds, EagleProposer(head, llm, embeds), settings, 4, set(), clock,
                                       tree=TreeShape(topk=3, max_nodes=12)))
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 40
    assert runs[0].metrics["accepted"] > 0 and runs[0].metrics["mean_accepted_tokens"] > 1.0


def test_sampling_branching_fits_the_node_budget():
    assert sampling_branching(4, 8, 32) == 2  # 2 + 4 + 8 + 16 = 30 nodes
    assert sampling_branching(1, 8, 32) == 8
    assert sampling_branching(3, 4, 10) == 1  # a chain of 3 is all that fits 2-wide (2 + 4 + 8 > 10)
    assert sampling_branching(4, 8, 2) == 1


def test_sampled_trees_keep_every_drawn_child():
    """Tree rejection sampling needs each node's children to be all of its draws: none trimmed by value."""
    llm = tiny_llm(seed=3, vocab=32)
    _, embeds = prefilled(llm, length=12, seed=4)
    proposer = EagleProposer(init_head(llm), llm, embeds)
    with torch.inference_mode():
        target = DynamicTarget(llm)
        target.prefill(embeds)
        proposer.observe(target.last_hidden)
        tree = proposer.propose_tree([3], 4, 8, 32, GenerationSettings(do_sample=True, temperature=1.0),
                                     torch.Generator().manual_seed(0))
    children: dict[int, int] = {}
    for node in range(1, len(tree.tokens)):
        children[tree.parents[node]] = children.get(tree.parents[node], 0) + 1
    assert set(children.values()) == {2} and tree.size == 30
    assert set(tree.child_probs) == set(children)
    for node, q in tree.child_probs.items():
        torch.testing.assert_close(q.sum(), torch.tensor(1.0))


def test_a_head_file_that_does_not_match_its_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from egpt_speed.errors import EgptError

    head = init_head(tiny_llm())
    head.save(tmp_path / "head")
    weights = tmp_path / "head" / "eagle_head.safetensors"
    state = load_file(str(weights))
    state.pop("fc.weight")
    save_file(state, str(weights))
    with pytest.raises(EgptError, match="does not match its config"):
        EagleHead.load(tmp_path / "head", CPU, torch.float32)
