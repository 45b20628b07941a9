"""Issue 11: which attention kernel a captured decode step (1 query) and a tree verify (5–65 queries) should use
over the static cache — the verify's masked attention is half of its extra cost at 7B (issue11_h200_20261203_evening).

    python benchmarks/attention_probe.py --out DIR        # CUDA only
Per shape (7B: 32 q / 32 kv heads × 128; tiny: 9 / 3 × 64), dtype and query count: the static cache's 1024
slots of which the first 660 are filled, the queries see the filled prefix plus (q > 1) a random tree ancestry
among themselves, exactly the mask StaticEngine builds. Backends: SDPA cuDNN / memory-efficient / math with the
dense boolean mask; FlexAttention (compiled, the BlockMask built inside the call as the `flex` preparer's
engine builds it, egpt_speed.flex), whose empty blocks
(the unused slots) it skips and whose full blocks it runs unmasked; the SDPA flash kernel over the filled slots
without a mask (q = 1 only: the lower bound a split-KV kernel could reach). Each: CUDA-graph replays, median of 5
rounds of 50, and the largest difference from the math backend's output. Writes attention_probe_<stamp>.json/.md.
For grouped heads (tiny) also each SDPA backend on KV heads repeated, without enable_gqa: the call transformers'
sdpa attention makes when it is given a mask (use_gqa_in_sdpa), i.e. what the engine's forwards run. The
2026-12-03 night record lacked it (its tiny '–' for the memory-efficient kernel is enable_gqa's refusal); on
repeated heads that kernel took 87 µs a layer in float32 in 2026-11-28's captured step, which is why
static_decode.DECODE_SDPA_BACKENDS sends float32 to math (results/issue11_step_budget_20261128.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from egpt_speed.flex import block_mask_from_dense  # noqa: E402
from int8wo_probe import time_replays  # noqa: E402  (median µs of one replay)

SHAPES = {"7b": (32, 32, 128), "tiny": (9, 3, 64)}
SLOTS, FILLED = 1024, 660
QUERIES = (1, 5, 17, 33, 65)
SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def tree_mask(queries: int, generator: torch.Generator) -> torch.Tensor:
    """[1, 1, q, SLOTS] bool: the filled prefix, then each query sees itself and a random earlier query's ancestry."""
    ancestry = torch.eye(queries, dtype=torch.bool)
    for node in range(1, queries):
        parent = int(torch.randint(0, node, (1,), generator=generator))
        ancestry[node] |= ancestry[parent]
    mask = torch.zeros(queries, SLOTS, dtype=torch.bool)
    mask[:, :FILLED] = True
    mask[:, FILLED:FILLED + queries] = ancestry
    return mask.view(1, 1, queries, SLOTS).cuda()


def replay_us(body, rounds: int = 5, replays: int = 50) -> float:
    """Median µs of one call of `body`, captured in a CUDA graph of `replays` calls."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            body()
    return time_replays(graph, rounds) / replays


def variants(q, k, v, mask, queries: int) -> dict:
    """name → a zero-argument call writing its output into a fixed buffer (graph-safe)."""
    gqa = q.shape[1] != k.shape[1]
    calls = {}
    for name, backend in SDPA.items():
        def sdpa(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        calls[name] = sdpa
    if gqa:  # transformers' sdpa call with a mask under compile: the KV heads repeated, no enable_gqa (use_gqa_in_sdpa)
        k_full, v_full = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        for name, backend in SDPA.items():
            def sdpa_repeated(backend=backend):
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask)
            calls[f"{name}, KV repeated"] = sdpa_repeated
    # as in a compiled step of the `flex` preparer's engine: the BlockMask is built from the dense mask every call
    compiled = torch.compile(lambda: flex_attention(q, k, v, block_mask=block_mask_from_dense(mask), enable_gqa=gqa),
                             dynamic=False, fullgraph=True)
    calls["flex"] = compiled
    # the engine builds the BlockMask once a step and every layer reuses it: the kernel alone, per layer
    prebuilt = block_mask_from_dense(mask)
    calls["flex, mask prebuilt"] = torch.compile(lambda: flex_attention(q, k, v, block_mask=prebuilt, enable_gqa=gqa),
                                                 dynamic=False, fullgraph=True)
    if queries == 1:
        def flash_filled():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :FILLED], v[:, :, :FILLED], enable_gqa=gqa)
        calls["unmasked filled slots"] = flash_filled
    return calls


def probe(shape: str, dtype: torch.dtype, queries: int, generator: torch.Generator) -> dict:
    torch._dynamo.reset()  # 15 compilations of flex_attention: past the recompile limit dynamo would run it eager
    heads, kv_heads, head_dim = SHAPES[shape]
    q = torch.randn(1, heads, queries, head_dim, generator=generator).to("cuda", dtype)
    k, v = (torch.randn(1, kv_heads, SLOTS, head_dim, generator=generator).to("cuda", dtype) for _ in range(2))
    mask = tree_mask(queries, generator)
    calls = variants(q, k, v, mask, queries)
    reference = calls["math"]().float()
    row = {}
    for name, call in calls.items():
        try:
            error = (call().float() - reference).abs().max().item()
            row[name] = {"us": replay_us(call), "max_abs_diff_vs_math": error}
        except Exception as failure:  # noqa: BLE001 - a backend that refuses this shape is a result too
            row[name] = {"error": f"{type(failure).__name__}: {str(failure)[:200]}"}
    return row


def render(rows: list[dict]) -> str:
    names = sorted({name for row in rows for name in row["variants"]}, key=lambda n: (n == "unmasked filled slots", n))
    lines = [f"# attention probe: {SLOTS}-slot static cache, {FILLED} filled ({torch.cuda.get_device_name()})", "",
             "µs per call (CUDA-graph replays, median); '–' = refused", "",
             "| shape | dtype | queries | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for row in rows:
        cells = [f"{row['variants'][n]['us']:.1f}" if "us" in row["variants"].get(n, {}) else "–" for n in names]
        lines.append(f"| {row['shape']} | {row['dtype']} | {row['queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_probe.py measures CUDA kernels; run it on the GPU machine.")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape, dtype in (("7b", torch.bfloat16), ("tiny", torch.bfloat16), ("tiny", torch.float32)):
        for queries in QUERIES:
            rows.append({"shape": shape, "dtype": str(dtype).replace("torch.", ""), "queries": queries,
                         "variants": probe(shape, dtype, queries, generator)})
            print(render(rows[-1:]).splitlines()[-1], flush=True)
    stem = args.out / f"attention_probe_{time.strftime('%Y%m%d_%H%M%S')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    stem.with_suffix(".md").write_text(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
