"""Which FlexAttention call shapes inductor lowers on this GPU (issue 11: the `flex` preparer's BlockMask,
built inside the compiled step from the engine's dense mask, failed to lower on the H200's torch 2.11 with
"'function' object has no attribute 'graph'"). Each variant is compiled alone and its traceback's end kept.
The record (results/issue11_h200_20261203_night/flex_lowering_probe.md) was taken with the earlier
block_mask_from_dense, whose mask_mod read its own padded copy; the "reads padded" cases keep that form, and the
"block_mask_from_dense" cases now run the fixed one.

The second record (2026-12-03, eighth session): the fixed mask function lowered at 7B shape, but the `tiny`
float32 tree verify (9 query heads on 3 KV heads, head size 64) failed with "'int' object has no attribute
'free_symbols'"; --heads 9 --kv-heads 3 --head-dim 64 --dtype float32 runs the GQA cases at that shape.

    python3 benchmarks/flex_lowering_probe.py [--device cuda] [--backend inductor] [--heads H --kv-heads K ...]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from egpt_speed.flex import BLOCK, _blocks_of, block_mask_from_dense

sys.path.insert(0, str(Path(__file__).parent))
SLOTS, FILLED = 1024, 660


def tree_like_mask(queries: int, device: str) -> torch.Tensor:
    allowed = torch.zeros(1, 1, queries, SLOTS, dtype=torch.bool, device=device)
    allowed[..., :FILLED] = True
    allowed[..., FILLED:FILLED + queries] = torch.tril(torch.ones(queries, queries, dtype=torch.bool, device=device))
    return allowed


def candidate(allowed: torch.Tensor, read: str) -> BlockMask:
    """block_mask_from_dense with the block lists from a functional pad; mask_mod reads `read`: 'padded' (the
    padded intermediate) or 'allowed' (the caller's tensor, indices clamped into range)."""
    queries, slots = allowed.shape[-2:]
    q_blocks, kv_blocks = -(-queries // BLOCK), -(-slots // BLOCK)
    padded = torch.nn.functional.pad(allowed[0, 0], (0, kv_blocks * BLOCK - slots, 0, q_blocks * BLOCK - queries))
    real_rows = torch.arange(q_blocks * BLOCK, device=allowed.device).view(-1, 1) < queries
    some = padded.view(q_blocks, BLOCK, kv_blocks, BLOCK).any(3).any(1)
    every = (padded | ~real_rows).view(q_blocks, BLOCK, kv_blocks, BLOCK).all(3).all(1) & some
    partial_counts, partial_indices = _blocks_of(some & ~every)
    full_counts, full_indices = _blocks_of(every)
    dense = allowed[0, 0]

    def mask_padded(batch, head, query, slot):
        return padded[query, slot]

    def mask_allowed(batch, head, query, slot):
        return dense[torch.clamp(query, max=queries - 1), torch.clamp(slot, max=slots - 1)]
    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=(BLOCK, BLOCK),
                                    mask_mod=mask_padded if read == "padded" else mask_allowed,
                                    seq_lengths=(queries, slots), compute_q_blocks=False)


def gqa_cases(q, k, v, mask) -> dict:
    """The engine's call with grouped KV heads, against the same call on repeated KV heads and on the main
    (non-decoding) kernel: which of GQA, the kernel choice or the mask breaks the lowering."""
    repeat = q.shape[1] // k.shape[1]
    k_full, v_full = (t.repeat_interleave(repeat, dim=1) for t in (k, v))
    main_kernel = {"FORCE_USE_FLEX_ATTENTION": True}
    return {
        "no mask, GQA": lambda: flex_attention(q, k, v, enable_gqa=True),
        "block_mask_from_dense outside, GQA": (
            lambda bm=block_mask_from_dense(mask): flex_attention(q, k, v, block_mask=bm, enable_gqa=True)),
        "from_dense inside; intermediate mask, GQA (the engine)": lambda: flex_attention(
            q, k, v, block_mask=block_mask_from_dense(mask & mask), enable_gqa=True),
        "from_dense inside; intermediate mask, KV heads repeated": lambda: flex_attention(
            q, k_full, v_full, block_mask=block_mask_from_dense(mask & mask)),
        "from_dense inside; intermediate mask, KV heads repeated, main kernel": lambda: flex_attention(
            q, k_full, v_full, block_mask=block_mask_from_dense(mask & mask), kernel_options=main_kernel),
        "from_dense inside; intermediate mask, GQA, main kernel": lambda: flex_attention(
            q, k, v, block_mask=block_mask_from_dense(mask & mask), enable_gqa=True, kernel_options=main_kernel),
    }


def cases(q, k, v, mask):
    gqa = q.shape[1] != k.shape[1]
    if gqa:
        return gqa_cases(q, k, v, mask)
    outside = block_mask_from_dense(mask)
    dense = mask[0, 0]

    def causal(b, h, qi, kv):
        return kv <= qi + FILLED

    def captured(b, h, qi, kv):
        return dense[qi, kv]
    return {
        "no mask": lambda: flex_attention(q, k, v, enable_gqa=gqa),
        "create_block_mask outside, index-free mask_mod": (
            lambda bm=create_block_mask(causal, 1, 1, q.shape[2], SLOTS, device=q.device): flex_attention(
                q, k, v, block_mask=bm, enable_gqa=gqa)),
        "create_block_mask outside, mask_mod reads an input tensor": (
            lambda bm=create_block_mask(captured, 1, 1, q.shape[2], SLOTS, device=q.device): flex_attention(
                q, k, v, block_mask=bm, enable_gqa=gqa)),
        "block_mask_from_dense outside": lambda: flex_attention(q, k, v, block_mask=outside, enable_gqa=gqa),
        "block_mask_from_dense inside (the preparer)": lambda: flex_attention(
            q, k, v, block_mask=block_mask_from_dense(mask), enable_gqa=gqa),
        # the engine computes its mask inside the step: `mask & mask` stands for that intermediate
        "pad, reads padded; input mask": lambda: flex_attention(q, k, v, block_mask=candidate(mask, "padded"), enable_gqa=gqa),
        "pad, reads padded; intermediate mask": lambda: flex_attention(
            q, k, v, block_mask=candidate(mask & mask, "padded"), enable_gqa=gqa),
        "pad, reads allowed; input mask": lambda: flex_attention(q, k, v, block_mask=candidate(mask, "allowed"), enable_gqa=gqa),
        "pad, reads allowed; intermediate mask": lambda: flex_attention(
            q, k, v, block_mask=candidate(mask & mask, "allowed"), enable_gqa=gqa),
        "from_dense inside; intermediate mask": lambda: flex_attention(
            q, k, v, block_mask=block_mask_from_dense(mask & mask), enable_gqa=gqa),
    }


def run_case(name: str, call, reference: torch.Tensor, args) -> str:
    """One case compiled alone (fullgraph, static shapes) under inference mode, as the engine runs; on CUDA the
    same compiled function timed by CUDA-graph replays. Returns the report line's tail, or the traceback's end."""
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            compiled = torch.compile(call, backend=args.backend, fullgraph=True, dynamic=False)
            out = compiled()
            diff = float("nan") if name == "no mask" else (out.float() - reference).abs().max().item()
            timing = ""
            if args.device == "cuda":
                from attention_probe import replay_us
                timing = f", {replay_us(compiled):.1f} us a call (graph replays)"
        return f"ok, max diff vs sdpa {diff:.3g}{timing}"
    except Exception:  # noqa: BLE001 - the traceback is the result
        return "FAILED\n" + "".join(traceback.format_exc().splitlines(True)[-args.tail:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--queries", default="1,33")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    parser.add_argument("--tail", type=int, default=6, help="traceback lines kept for a failed case")
    args = parser.parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    for queries in map(int, args.queries.split(",")):
        q = torch.randn(1, args.heads, queries, args.head_dim, device=args.device, dtype=dtype)
        k, v = (torch.randn(1, args.kv_heads, SLOTS, args.head_dim, device=args.device, dtype=dtype) for _ in range(2))
        mask = tree_like_mask(queries, args.device)
        reference = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=args.heads != args.kv_heads).float()
        if args.device == "cuda":
            from attention_probe import replay_us
            sdpa_us = replay_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=args.heads != args.kv_heads))
            print(f"q={queries} sdpa (default backend): {sdpa_us:.1f} us")
        for name, call in cases(q, k, v, mask).items():
            print(f"q={queries} {name}: {run_case(name, call, reference, args)}")


if __name__ == "__main__":
    main()
