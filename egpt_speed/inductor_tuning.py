"""The inductor settings a compiled decode step is built under: torchao's for a torchao-quantized LLM, else
gpt-fast's coordinate-descent tuning when asked for (`--coordinate-descent`; off by default).

With `coordinate_descent_tuning` inductor turns a one-row matmul into a multiply-and-sum reduction, fuses it
with its neighbours (RMSNorm, SiLU, the KV-cache write) and tunes the reduction's block sizes. H200,
synthetic-7b bfloat16, `--compile-mode default`, 4 interleaved rounds (benchmarks/results/
step_bandwidth_7b_h200_20261203_evening): the compiled step went 5.024 → 4.302 ms a token (68 → 79 % of the
copy bandwidth), but with `fused` projections 4.545 → 5.147 ms (its fused q/k/v reduction, with the norm inside,
ran at 1.5 TB/s). Multi-row matmuls (a verify, the prefill) keep their GEMMs either way.
Why not the default (it was, briefly): the next run of the same step under the same setting (H200, 2026-12-03
17:43, benchmarks/results/issue11_h200_20261203_night) took 4.999 ms — the tuner chose other block sizes, and the
down projection's fused reduction ran at 51.3 µs a layer instead of 28.5 — so the gain is the tuner's luck of
the run, not a property of the setting; and a `tiny` bfloat16 compare of compile, compile+eagle and
compile+eagle-tree under it finished no sample in 420 s (its journal holds only the header; earlier
runs of the same compare without it finished inside one 600-s device call). A user who wants it asks.
"""

from __future__ import annotations

from egpt_speed.quantize import inductor_config_for

COORDINATE_DESCENT = {"coordinate_descent_tuning": True}


def decode_inductor_config(llm, choice: bool | None) -> dict:
    """The torch._inductor.config entries to compile `llm`'s steps under. A torchao LLM keeps torchao's settings
    (coordinate descent included: without it int8 weight-only runs as aten._weight_int8pack_mm, ~15x slower at
    7B: 51.3 against 3.35 ms a token, H200) unless --no-coordinate-descent drops that part."""
    torchao = inductor_config_for(llm)
    if torchao:
        if choice is False:
            return {key: value for key, value in torchao.items() if not key.startswith("coordinate_descent")}
        return torchao
    return dict(COORDINATE_DESCENT) if choice else {}
