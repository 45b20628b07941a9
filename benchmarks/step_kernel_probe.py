"""Why a compiled `tiny` decode step costs 3.9 ms in float32 and 1.5 ms in bfloat16 (issue 11): which kernels.

    python benchmarks/step_kernel_probe.py --out DIR        # GPU; no GGUF needed (random SmolLM2-135M-shaped Llama)
Captured (no inductor, no compile time) StaticEngine decode steps and a 33-wide tree-shaped verify per dtype
and attention implementation; median replay ms and the torch.profiler kernel table (CUDA time order).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed.static_decode import StaticEngine, StaticTarget  # noqa: E402
from egpt_speed.timing import median_ms  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                    rope_theta=100000.0)
PREFIX = 622
# (dtype, attn_implementation, SDPA backends of the captured forwards); 2026-11-28 first run: the PyTorch-choice
# rows and eager attention; second run: the math backend (static_decode.DECODE_SDPA_BACKENDS)
VARIANTS = ((torch.float32, "sdpa", "pytorch"), (torch.bfloat16, "sdpa", "pytorch"), (torch.float32, "eager", "pytorch"),
            (torch.float32, "sdpa", "math"), (torch.bfloat16, "sdpa", "math"))
PROFILE = True
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def engine_for(dtype: torch.dtype, attention: str) -> tuple[StaticEngine, torch.Tensor]:
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M, attn_implementation=attention)
    llm = LlamaForCausalLM(config).to(DEVICE, dtype).eval()
    engine = StaticEngine(llm, compile_mode=None)
    engine.setup(1, PREFIX + 64 + 40)
    embeds = torch.randn(1, PREFIX, 576, device=DEVICE, dtype=dtype) * 0.5
    engine.prefill(embeds)
    return engine, embeds


def verify_step(engine: StaticEngine, embeds: torch.Tensor):
    target = StaticTarget(engine, gamma=32)  # a 33-wide chain verify: the tree verify's GEMM shapes
    target.setup(PREFIX + 64, 0)
    target.prefill(embeds)
    tokens = torch.randint(3, 1000, (1, 33), device=DEVICE)

    def run():
        target.verify(tokens)
        target.crop(PREFIX)
    return run


def kernels(step, label: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize() if DEVICE == "cuda" else None
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=90)
    return f"### {label} (10 runs)\n```\n{table}\n```\n"


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    rows, tables = [], []
    from torch.nn.attention import SDPBackend

    from egpt_speed import static_decode

    backends = {"math": {torch.float32: [SDPBackend.MATH], torch.bfloat16: [SDPBackend.MATH]}, "pytorch": {}}
    for dtype, attention, backend in VARIANTS:
        static_decode.DECODE_SDPA_BACKENDS = backends[backend]
        attention_label = f"{attention} ({backend})" if attention == "sdpa" else attention
        engine, embeds = engine_for(dtype, attention)
        step = engine._steps["decode"]
        verify = verify_step(engine, embeds)
        step_ms, verify_ms = median_ms(step, engine.device, 50), median_ms(verify, engine.device, 30)
        rows.append(f"| {dtype} | {attention_label} | {step_ms:.3f} | {verify_ms:.3f} |")
        print(rows[-1], flush=True)
        if PROFILE and attention == "sdpa":
            tables += [kernels(step, f"{dtype} {attention} decode step"), kernels(verify, f"{dtype} {attention} 33-wide verify")]
        del engine
        torch.cuda.empty_cache()
    text = ("# step_kernel_probe: SmolLM2-135M shape, random weights, captured StaticEngine (no inductor)\n\n"
            f"- {torch.cuda.get_device_name() if DEVICE == 'cuda' else DEVICE}, torch {torch.__version__}\n\n"
            "| dtype | attention | decode step ms | 33-wide verify ms (incl. host copies) |\n|---|---|---:|---:|\n"
            + "\n".join(rows) + "\n\n" + "\n".join(tables))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step_kernel_probe_{time.strftime('%Y%m%d_%H%M%S')}.md"
    path.write_text(text)
    print(text[:6000])


if __name__ == "__main__":
    main()
