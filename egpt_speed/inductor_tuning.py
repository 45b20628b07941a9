"""The inductor settings a compiled decode step is built under: torchao's for a torchao-quantized LLM, else
gpt-fast's coordinate-descent tuning where it was measured faster (`--coordinate-descent`).

With `coordinate_descent_tuning` inductor turns a one-row matmul into a multiply-and-sum reduction, fuses it
with its neighbours (RMSNorm, SiLU, the KV-cache write) and tunes the reduction's block sizes. H200,
synthetic-7b bfloat16, `--compile-mode default`, 4 interleaved rounds (benchmarks/results/
step_bandwidth_7b_h200_20261203_evening): the compiled step went 5.024 → 4.302 ms a token (68 → 79 % of the
copy bandwidth), but with `fused` projections 4.545 → 5.147 ms (its fused q/k/v reduction, with the norm inside,
ran at 1.5 TB/s). Multi-row matmuls (a verify, the prefill) keep their GEMMs either way.
"""

from __future__ import annotations

import torch

from egpt_speed.fuse import is_fused
from egpt_speed.quantize import inductor_config_for

COORDINATE_DESCENT = {"coordinate_descent_tuning": True}
# where unset means on: the dtypes it was measured faster in (bf16; fp16 shares its GEMV kernels' arithmetic)
COORDINATE_DESCENT_DTYPES = (torch.bfloat16, torch.float16)


def resolve_coordinate_descent(choice: bool | None, device: torch.device, dtype: torch.dtype, fused: bool) -> bool:
    """--coordinate-descent / --no-coordinate-descent as given; unset, on for a half-precision LLM without `fused`
    on CUDA (measured faster there, slower with `fused`; float32 and the CPU are unmeasured or unaffected)."""
    if choice is not None:
        return bool(choice)
    return device.type == "cuda" and dtype in COORDINATE_DESCENT_DTYPES and not fused


def decode_inductor_config(llm, choice: bool | None) -> dict:
    """The torch._inductor.config entries to compile `llm`'s steps under. A torchao LLM keeps torchao's settings
    (coordinate descent included: without it int8 weight-only runs as aten._weight_int8pack_mm, ~12x slower at
    7B) unless --no-coordinate-descent drops that part."""
    torchao = inductor_config_for(llm)
    if torchao:
        if choice is False:
            return {key: value for key, value in torchao.items() if not key.startswith("coordinate_descent")}
        return torchao
    weight = llm.get_input_embeddings().weight
    return dict(COORDINATE_DESCENT) if resolve_coordinate_descent(choice, weight.device, weight.dtype, is_fused(llm)) else {}
