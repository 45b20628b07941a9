"""The LLM's attention as PyTorch FlexAttention with a block-sparse mask (the `flex` preparer).

Why: over the static cache every captured forward attends to all M slots under a dense mask, so SDPA reads the
unused slots and, for a masked multi-row query (a tree verify), runs cuDNN's masked kernel over all of them: at
7B shape a 33-row verify spends 26.8 µs a layer in attention against 9.5 µs for a decode step
(benchmarks/results/issue11_h200_20261203_evening.md). A BlockMask built from the same dense mask lets the
kernel skip empty 128-slot blocks, run full blocks (the filled prefix) without evaluating the mask, and apply it
only to the blocks holding the tree; compiled, inductor emits its flex-decoding kernel for few queries (eager calls
on CUDA, e.g. the prefill bucket, go through one torch.compile'd flex_attention).

Written by hand (a registered transformers attention function, not transformers' "flex_attention"): that one
always calls a separately torch.compile'd flex_attention outside a compiled region, which fails to build on the
CPU (torch 2.13's C++ template) and builds masks with its own mask functions, while the static engine passes the
mask it already computes. On the CPU (tests) FlexAttention's reference implementation runs: same numbers.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from egpt_speed.errors import EgptError

FLEX = "egpt_flex"
BLOCK = 128  # FlexAttention's default block size, for queries and keys


def _blocks_of(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Qb, Kb] bool → (counts [1, 1, Qb], indices [1, 1, Qb, Kb]) int32, the selected blocks first, in order."""
    counts = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def block_mask_from_dense(allowed: torch.Tensor) -> BlockMask:
    """allowed: [1, 1, q, M] bool (True = attend) → the same mask as a BlockMask: blocks with no allowed entry are
    skipped, blocks with every (real) entry allowed run unmasked, the rest read `allowed`. Fixed shapes, no host
    sync: built inside captured graphs."""
    if allowed.dim() != 4 or allowed.shape[0] != 1 or allowed.shape[1] != 1:
        raise EgptError(f"the flex attention takes one [1, 1, q, M] mask (batch 1), not {tuple(allowed.shape)}; use sdpa.")
    queries, slots = allowed.shape[-2:]
    q_blocks, kv_blocks = -(-queries // BLOCK), -(-slots // BLOCK)
    dense = allowed[0, 0]
    padded = torch.nn.functional.pad(dense, (0, kv_blocks * BLOCK - slots, 0, q_blocks * BLOCK - queries))
    real_rows = torch.arange(q_blocks * BLOCK, device=allowed.device).view(-1, 1) < queries
    some = padded.view(q_blocks, BLOCK, kv_blocks, BLOCK).any(3).any(1)
    every = (padded | ~real_rows).view(q_blocks, BLOCK, kv_blocks, BLOCK).all(3).all(1) & some
    partial_counts, partial_indices = _blocks_of(some & ~every)
    full_counts, full_indices = _blocks_of(every)

    def mask_mod(batch, head, query, slot):
        # reads the caller's mask, clamped into range (the kernel discards rows and slots past the lengths): on
        # CUDA (torch 2.11, H200) inductor failed to lower a mask_mod reading `padded`, a tensor made inside
        # the compiled graph by the mask function itself ("'function' object has no attribute 'graph'";
        # benchmarks/flex_lowering_probe.py), while one reading the caller's tensor lowered
        return dense[torch.clamp(query, max=queries - 1), torch.clamp(slot, max=slots - 1)]
    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=(BLOCK, BLOCK),
                                    mask_mod=mask_mod, seq_lengths=(queries, slots), compute_q_blocks=False)  # no backward


def causal_bool_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """[1, 1, q, k] causal aligned top-left (query i sees keys ≤ i), what SDPA's is_causal computes for the calls
    transformers gives no mask: a prefill into an empty cache, whose unwritten slots lie past the queries."""
    return (torch.arange(keys, device=device).view(1, -1) <= torch.arange(queries, device=device).view(-1, 1))[None, None]


def flex_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, scaling=None,
                 dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query [b, h, q, d], key/value [b, kv_h, k, d] → ([b, q, h, d], None).

    attention_mask: a BlockMask, a [1, 1, q, k] bool tensor (the static engine's; transformers' sdpa mask
    function for other callers), or None (no padding: causal for q > 1, everything for one query)."""
    if dropout:
        raise EgptError("the flex attention is for inference; dropout is not supported.")
    if attention_mask is None and query.shape[2] > 1:
        attention_mask = causal_bool_mask(query.shape[2], key.shape[2], query.device)
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dtype != torch.bool:
            raise EgptError("the flex attention takes boolean masks; use sdpa or eager for additive ones.")
        attention_mask = block_mask_from_dense(attention_mask)
    out = _flex_for(query)(query, key, value, block_mask=attention_mask, scale=scaling,
                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def _flex_for(query: torch.Tensor):
    """flex_attention as traced into a compiled step; outside one, on CUDA, a compiled copy (uncompiled,
    FlexAttention materialises every score: the prefill bucket and eager steps would pay that); on the CPU the
    reference implementation (inductor has no CPU lowering for it)."""
    if torch.compiler.is_compiling() or query.device.type != "cuda":
        return flex_attention
    return _compiled_flex()


def register_flex() -> str:
    """Register FLEX as a transformers attention implementation (attention + sdpa's mask function); returns it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(FLEX, flex_forward)
    AttentionMaskInterface.register(FLEX, sdpa_mask)
    return FLEX
