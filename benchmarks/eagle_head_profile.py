"""Where an EAGLE draft step's milliseconds go: the eager head (EagleProposer) vs the captured one
(static_draft.StaticEagleDrafter), float32 and bfloat16, on `tiny` with the shipped head.

    python benchmarks/eagle_head_profile.py --out DIR      # on the GPU machine
Writes eagle_head_profile_<stamp>.md: per dtype, ms per γ-chain draft for both drafters and the
torch.profiler top ops (self CPU and CUDA time) of the eager chain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed.decoding import GenerationSettings  # noqa: E402
from egpt_speed.drafts import load_draft  # noqa: E402
from egpt_speed.models import load_model  # noqa: E402
from egpt_speed.proposers import EagleProposer  # noqa: E402
from egpt_speed.static_draft import StaticEagleDrafter  # noqa: E402

GAMMA, PREFIX, STEPS = 4, 600, 30


def drafters(model, head, embeds, hidden):
    eager = EagleProposer(head, model.llm, embeds)
    captured = StaticEagleDrafter(head, model.llm, GAMMA).begin(embeds, 64)
    for drafter in (eager, captured):
        drafter.observe(hidden)
    return {"eager": eager, "captured": captured}


def chain_ms(drafter, committed, hidden_step) -> list[float]:
    """Times propose() over STEPS steps, feeding one fresh feature per step (as after a full rejection)."""
    settings, times = GenerationSettings(max_new_tokens=64), []
    for step in range(STEPS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        drafter.propose(committed + [5] * step, GAMMA, settings, None)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        drafter.observe(hidden_step)
        drafter.rollback(committed + [5] * (step + 1))
    return times[3:]


def profile_table(drafter, committed, hidden_step) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        chain_ms(drafter, committed, hidden_step)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)


def run(dtype: torch.dtype, lines: list[str]) -> None:
    device = torch.device("cuda")
    model = load_model("tiny", dtype, device)
    head = load_draft("tiny-eagle", model, "tiny", device, dtype).head
    hidden_size = model.llm.config.hidden_size
    embeds = torch.randn(1, PREFIX, hidden_size, device=device, dtype=dtype) * 0.5
    with torch.inference_mode():
        hidden = model.llm.model(inputs_embeds=embeds).last_hidden_state
        aux = head.aux_layers_for(len(model.llm.model.layers))
        if aux:  # an EAGLE-3 head reads three layers' inputs (3H wide): for a cost profile, the last layer's repeated
            hidden = hidden.repeat(1, 1, len(aux))
        step_hidden = hidden[:, -1:].clone()
        for name, drafter in drafters(model, head, embeds, hidden).items():
            times = chain_ms(drafter, [7], step_hidden)
            lines.append(f"| {dtype} | {name} | {statistics.median(times):.3f} | {min(times):.3f} |")
        lines.append("")
        eager = drafters(model, head, embeds, hidden)["eager"]
        table = profile_table(eager, [7], step_hidden)
    lines += [f"eager chain, {dtype}, torch.profiler (self CPU order):", "```", table, "```", ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    out = parser.parse_args().out
    lines = [f"# EAGLE head draft cost, γ = {GAMMA}, prefix {PREFIX}, {torch.cuda.get_device_name()}", "",
             "| dtype | drafter | median ms per γ-chain | min |", "|---|---|---:|---:|"]
    for dtype in (torch.float32, torch.bfloat16):
        run(dtype, lines)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eagle_head_profile_{time.strftime('%Y%m%d_%H%M%S')}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main()
