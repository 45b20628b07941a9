"""`flex`: FlexAttention with a block mask built from the static engine's dense mask (egpt_speed.flex).

- attention under the BlockMask equals SDPA under the dense mask (trees, GQA, cache lengths off the block grid);
- the BlockMask skips empty blocks and runs full ones unmasked;
- flex+compile and flex+compile+eagle-tree decode baseline's greedy tokens (float32, CPU: the reference kernel),
  and HF generate on the flex LLM too; the eager eagle-tree, which builds additive masks, refuses flex.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from egpt_speed.decoding import DecodeRequest, GenerationSettings
from egpt_speed.eagle import EagleHead, head_config_from_target
from egpt_speed.errors import EgptError
from egpt_speed.flex import BLOCK, block_mask_from_dense, flex_forward
from egpt_speed.prompt import EVENT_TOKEN_INDEX
from egpt_speed.strategies import registry
from egpt_speed.strategies.registry import RunContext
from egpt_speed.timing import Clock
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")


def tree_mask(queries: int, slots: int, filled: int, generator: torch.Generator) -> torch.Tensor:
    """[1, 1, q, slots]: the filled prefix, then each query sees itself and one random earlier query's ancestry."""
    ancestry = torch.eye(queries, dtype=torch.bool)
    for node in range(1, queries):
        ancestry[node] |= ancestry[int(torch.randint(0, node, (1,), generator=generator))]
    mask = torch.zeros(queries, slots, dtype=torch.bool)
    mask[:, :filled] = True
    mask[:, filled:filled + queries] = ancestry
    return mask[None, None]


@pytest.mark.parametrize("queries,slots,filled,heads,kv_heads", [
    (1, 512, 300, 4, 2), (5, 384, 130, 4, 4), (33, 300, 129, 6, 2), (150, 640, 256, 2, 1)])
def test_attention_under_the_block_mask_equals_sdpa_under_the_dense_one(queries, slots, filled, heads, kv_heads):
    generator = torch.Generator().manual_seed(queries)
    query = torch.randn(1, heads, queries, 16, generator=generator)
    key, value = (torch.randn(1, kv_heads, slots, 16, generator=generator) for _ in range(2))
    mask = tree_mask(queries, slots, filled, generator)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=heads != kv_heads)
    got, _ = flex_forward(None, query, key, value, block_mask_from_dense(mask), scaling=None)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_the_block_mask_skips_empty_blocks_and_runs_full_ones_unmasked():
    """One query at slot 200 of a 512-slot cache: block 0 full, block 1 partial, blocks 2 and 3 never read."""
    mask = (torch.arange(512) <= 200).view(1, 1, 1, 512)
    block_mask = block_mask_from_dense(mask)
    assert block_mask.full_kv_num_blocks.flatten().tolist() == [1]
    assert block_mask.full_kv_indices[0, 0, 0, :1].tolist() == [0]
    assert block_mask.kv_num_blocks.flatten().tolist() == [1]
    assert block_mask.kv_indices[0, 0, 0, :1].tolist() == [1]
    assert block_mask.BLOCK_SIZE == (BLOCK, BLOCK) and block_mask.shape == (1, 1, 1, 512)


def reference_blocks(mask: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Per query block, the key blocks with some / every (real-row) entry allowed, by plain loops."""
    dense = mask[0, 0]
    queries, slots = dense.shape
    partial, full = [], []
    for q0 in range(0, queries, BLOCK):
        rows = dense[q0:q0 + BLOCK]
        blocks = [rows[:, k0:k0 + BLOCK] for k0 in range(0, slots, BLOCK)]
        every = [i for i, block in enumerate(blocks) if block.all() and block.shape[1] == BLOCK]
        some = [i for i, block in enumerate(blocks) if block.any() and i not in every]
        partial.append(some)
        full.append(every)
    return partial, full


@pytest.mark.parametrize("queries,slots,filled", [(1, 1024, 660), (33, 1024, 660), (33, 300, 128), (200, 640, 127),
                                                  (65, 512, 384), (130, 1000, 0)])
def test_the_block_lists_are_every_block_with_some_and_with_every_entry_allowed(queries, slots, filled):
    """What the kernel reads: uncompiled FlexAttention applies mask_mod everywhere, so only this checks the lists
    (a key block past the cache's end is partial: its padding is masked)."""
    mask = tree_mask(queries, slots, filled, torch.Generator().manual_seed(slots + queries))
    block_mask = block_mask_from_dense(mask)
    partial, full = reference_blocks(mask)
    for row, (some, every) in enumerate(zip(partial, full)):
        assert block_mask.kv_indices[0, 0, row, :block_mask.kv_num_blocks[0, 0, row]].tolist() == some
        assert block_mask.full_kv_indices[0, 0, row, :block_mask.full_kv_num_blocks[0, 0, row]].tolist() == every


def test_a_batched_or_additive_mask_is_refused_clearly():
    with pytest.raises(EgptError, match="batch 1"):
        block_mask_from_dense(torch.ones(2, 1, 3, 8, dtype=torch.bool))
    query = torch.randn(1, 2, 3, 8)
    with pytest.raises(EgptError, match="boolean masks"):
        flex_forward(None, query, query, query, torch.zeros(1, 1, 3, 3))


@pytest.fixture
def model(sp_tokenizer):
    """A fresh tiny EventGPT per test: `flex` switches the LLM's attention in place."""
    tiny = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    with torch.no_grad():  # sharper logits: fewer near-ties, so equality tests the code, not rounding
        tiny.llm.lm_head.weight.mul_(4.0)
    return tiny


def request_for(model, seed: int, new: int = 20) -> DecodeRequest:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, model.llm.config.vocab_size, (8,), generator=generator)
    prompt = torch.cat([torch.tensor([1]), text[:4], torch.tensor([EVENT_TOKEN_INDEX]), text[4:]])
    return DecodeRequest(f"s{seed}", prompt, torch.randn(5, model.hidden_size, generator=generator) * 0.5,
                         GenerationSettings(max_new_tokens=new))


def decode_result(name: str, model, request: DecodeRequest, **context):
    strategy = registry.build(name, RunContext(device=CPU, dtype=torch.float32, **context))
    strategy.prepare(model)
    clock = Clock(CPU)
    clock.begin()
    return strategy.decode(model, request, clock)


def decoded(name: str, model, request: DecodeRequest, **context) -> list[int]:
    return decode_result(name, model, request, **context).token_ids


def test_flex_compile_decodes_what_baseline_decodes(model):
    requests = [request_for(model, seed) for seed in (1, 2, 3)]
    expected = [decoded("baseline", model, request) for request in requests]
    assert [decoded("flex+compile", model, request) for request in requests] == expected
    assert model.llm.config._attn_implementation == "egpt_flex"
    assert [decoded("baseline", model, request) for request in requests] == expected  # HF generate on flex too


def test_a_static_tree_verify_under_flex_gives_every_node_the_logits_sdpa_gives(model):
    """Every node of a branching tree (not only the root a random head's drafts leave) sees its own ancestors."""
    from copy import deepcopy

    from egpt_speed.flex import register_flex
    from egpt_speed.attention import set_llm_attention
    from egpt_speed.static_decode import StaticEngine, StaticTarget
    from egpt_speed.tree import DraftTree

    flex_llm = deepcopy(model.llm)
    set_llm_attention(flex_llm, register_flex())
    embeds = torch.randn(1, 140, model.hidden_size, generator=torch.Generator().manual_seed(6)) * 0.5  # past a block
    tree = DraftTree([5, 7, 9, 11, 13, 17, 19], [-1, 0, 0, 1, 3, 2, 1])
    logits = []
    for llm in (model.llm, flex_llm):
        target = StaticTarget(StaticEngine(llm, cuda_graph=False), 4)
        target.setup(embeds.shape[1] + 24, tree_nodes=8)
        target.prefill(embeds)
        logits.append(target.verify_tree(tree))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, fused_step", [("flex+compile+eagle-tree", False), ("flex+compile+eagle", False),
                                              ("flex+compile+early-exit", False), ("flex+compile+eagle-tree", True),
                                              ("flex+compile+eagle", True)])
def test_flex_compile_speculation_equals_baseline(model, tmp_path, name, fused_step):
    """The registry path: speculation verified on the flex engine (tree, chain; early-exit drafts through HF's
    masks on the same flex attention; the fused step, CUDA's default, as one graph a step) decodes baseline's
    greedy tokens."""
    torch.manual_seed(0)
    EagleHead(head_config_from_target(model.llm.config)).eval().save(tmp_path / "head")
    context = {"draft_spec": str(tmp_path / "head"), "options": {"tree_nodes": 10, "fused_step": fused_step}}
    for seed in (4, 5):
        request = request_for(model, seed, new=24)
        result = decode_result(name, model, request, **context)
        assert result.token_ids == decoded("baseline", model, request)
        assert bool(result.metrics.get("fused_step")) == fused_step


def test_the_eager_eagle_tree_refuses_flex(model, tmp_path):
    torch.manual_seed(0)
    EagleHead(head_config_from_target(model.llm.config)).eval().save(tmp_path / "head")
    strategy = registry.build("flex+eagle-tree", RunContext(device=CPU, dtype=torch.float32, draft_spec=str(tmp_path / "head")))
    with pytest.raises(EgptError, match="flex only with compile"):
        strategy.prepare(model)



def test_flex_under_inductor_on_the_cpu_is_refused_before_it_runs():
    """Inductor has no CPU lowering for this FlexAttention (torch 2.13: NoValidChoicesError): say so up front."""
    strategy = registry.build("flex+compile", RunContext(device=CPU, dtype=torch.float32, options={"compile_mode": "default"}))
    assert "CPU" in strategy.unavailable_reason() and "--compile-mode" in strategy.unavailable_reason()
    assert registry.build("flex+compile", RunContext(device=CPU, dtype=torch.float32)).unavailable_reason() is None


def _tree_verify_buffers(slots: int, device: str):
    """A loaded 5-node branching tree (parents -1, 0, 0, 1, 2) at cache length 100, as a tree verify holds it."""
    from egpt_speed.static_decode import TreeVerifyBuffers

    parents = [-1, 0, 0, 1, 2]
    ancestry = torch.eye(5, dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            ancestry[node] |= ancestry[parent]
    buffers = TreeVerifyBuffers.allocate(5, slots, vocab=8, hidden_size=4, dtype=torch.float32, device=torch.device(device))
    depths = torch.tensor([0, 1, 1, 2, 2])
    buffers.load(torch.arange(5, device=device), depths.to(device), ancestry.to(device), base=100)
    return buffers


def _mask_build_and_flex(device: str, backend: str, dtype: torch.dtype, slots: int = 256,
                         mask: str = "step") -> tuple[torch.Tensor, torch.Tensor]:
    """The dense mask made inside the compiled call (as a step or a tree verify makes it) → BlockMask →
    FlexAttention, compiled with fullgraph=True; returns (its output, SDPA's under the same dense mask)."""
    tree = _tree_verify_buffers(slots, device)

    def dense_mask(positions, kv_positions):
        return tree.mask(kv_positions) if mask == "tree" else kv_positions <= positions.view(1, 1, -1, 1)

    def attention(query, key, value, positions, kv_positions):
        return flex_forward(None, query, key, value, block_mask_from_dense(dense_mask(positions, kv_positions)))[0]
    traced = torch.compile(attention, backend=backend, fullgraph=True, dynamic=False)
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 5, 16, generator=generator).to(device, dtype)
    key, value = (torch.randn(1, 2, slots, 16, generator=generator).to(device, dtype) for _ in range(2))
    positions, kv_positions = torch.arange(100, 105, device=device), torch.arange(slots, device=device).view(1, 1, 1, slots)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=dense_mask(positions, kv_positions),
                                              enable_gqa=True)
    return traced(query, key, value, positions, kv_positions), expected.transpose(1, 2)


def test_the_tree_verify_mask_is_the_prefix_plus_each_nodes_ancestors_even_over_stale_slots():
    """Rows: the cache before base, and in the tree's slots exactly the node's ancestors (itself included), whatever
    positions those slots held before (a rejected tree's stale entries may be below base)."""
    buffers = _tree_verify_buffers(120, "cpu")
    kv_positions = torch.arange(120).view(1, 1, 1, 120).clone()
    kv_positions[..., 100:105] = torch.tensor([3, 99, 100, 150, 0])  # stale: some below base
    ancestry = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                            dtype=torch.bool)
    expected = torch.zeros(5, 120, dtype=torch.bool)
    expected[:, :100] = True
    expected[:, 100:105] = ancestry
    assert torch.equal(buffers.mask(kv_positions), expected[None, None])


def test_the_tree_verify_mask_traces_without_select_scatter():
    """The CUDA failure's CPU-visible cause: an in-place mask traced to select_scatter at a constant index, which
    inductor inlined into FlexAttention's mask function and could not render on the H200 (the CUDA test below runs
    the lowering itself)."""
    from torch._dynamo.backends.common import aot_autograd

    buffers = _tree_verify_buffers(256, "cpu")
    ops = []

    def record(graph, inputs):
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph
    torch._dynamo.reset()
    torch.compile(buffers.mask, backend=aot_autograd(fw_compiler=record), fullgraph=True)(
        torch.arange(256).view(1, 1, 1, 256))
    assert ops and not [op for op in ops if "select_scatter" in op], ops


@pytest.mark.parametrize("mask", ["step", "tree"])
@pytest.mark.parametrize("slots", [256, 200])
def test_mask_building_and_flex_trace_as_one_graph(slots, mask):
    """What a compiled step or tree verify hands inductor on CUDA, traced through AOT autograd (inductor's lowering
    is CUDA's: the test below); 200 slots: a last key block past the cache, where the mask function's clamp reads."""
    out, expected = _mask_build_and_flex("cpu", "aot_eager", torch.float32, slots, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor lowers FlexAttention on CUDA only (the CPU runs "
                    "the reference implementation, covered above)")
@pytest.mark.parametrize("mask", ["step", "tree"])
@pytest.mark.parametrize("slots", [256, 200])
def test_mask_building_and_flex_lower_under_inductor_on_cuda(slots, mask):
    """On the H200 (torch 2.11) a mask_mod reading a tensor the BlockMask builder made failed to lower ("'function'
    object has no attribute 'graph'"); the one reading the caller's mask lowers (benchmarks/flex_lowering_probe.py).
    The tree verify's mask, built in place, then failed inside the template ("'int' object has no attribute
    'free_symbols'"): TreeVerifyBuffers.mask builds it out of place."""
    out, expected = _mask_build_and_flex("cuda", "inductor", torch.bfloat16, slots, mask)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
