"""Speculative-decoding cost model on the real shapes: verify cost of γ+1 tokens vs 1, draft/target ratio c.

Run on the GPU machine:
    python benchmarks/spec_cost.py --model synthetic-7b --draft synthetic-68m --out benchmarks/results
Writes spec_cost_<stamp>.json/.md: median ms of one target forward over k tokens at the EventGPT
prefix length, one draft step, c, and the speedup the Leviathan formula predicts at α = 0.6/0.7/0.8,
both as E/(γc+1) and with the measured verify cost E·t1/(γ·t_draft + t_verify(γ+1)).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed import metrics  # noqa: E402
from egpt_speed.decoding import crop_cache  # noqa: E402
from egpt_speed.drafts import load_draft  # noqa: E402
from egpt_speed.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from egpt_speed.prompt import tokenize_with_event_placeholder  # noqa: E402
from egpt_speed.results import capture_env, timestamped_name, write_json_atomic, write_text_atomic  # noqa: E402
from egpt_speed.timing import TimedRegion, measure_copy_bandwidth  # noqa: E402


def median_ms(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        with TimedRegion(device) as region:
            fn()
        samples.append(region.ms)
    return statistics.median(samples)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="synthetic-7b")
    parser.add_argument("--draft", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-gamma", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.model, dtype, device)
    draft = load_draft(args.draft, model, args.model, device, dtype)

    prompt = model.template.render("What are the key elements in this scene?", model.tokenizer)
    ids = torch.tensor(tokenize_with_event_placeholder(prompt, model.tokenizer, model.fold_to_vocab), device=device)
    features = torch.randn(582, model.hidden_size, device=device, dtype=dtype) * 0.02
    embeds = model.splice(ids, features)
    prefix_len = embeds.shape[1]
    cache = DynamicCache(config=model.llm.config)
    model.llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    # a realistic decode position: prefix + ~23 generated tokens (half of the seed's 45.5)
    warm = torch.randint(3, 1000, (1, 23), device=device)
    model.llm(input_ids=warm, past_key_values=cache, use_cache=True)
    base_len = prefix_len + 23

    def target_step(k: int):
        tokens = torch.randint(3, 1000, (1, k), device=device)

        def run():
            model.llm(input_ids=tokens, past_key_values=cache, use_cache=True)
            crop_cache(cache, base_len)
        return run

    verify_ms = {k: median_ms(target_step(k), device, args.repeats) for k in range(1, args.max_gamma + 2)}

    text_ids = ids[ids >= 0].unsqueeze(0)
    draft_cache = DynamicCache(config=draft.llm.config)
    if draft.multimodal:
        draft.llm(inputs_embeds=embeds, past_key_values=draft_cache, use_cache=True)
        draft_base = prefix_len
    else:
        draft.llm(input_ids=text_ids, past_key_values=draft_cache, use_cache=True)
        draft_base = text_ids.shape[1]
    one = torch.randint(3, 1000, (1, 1), device=device)

    def draft_step():
        draft.llm(input_ids=one, past_key_values=draft_cache, use_cache=True)
        crop_cache(draft_cache, draft_base)

    draft_ms = median_ms(draft_step, device, args.repeats)
    c = draft_ms / verify_ms[1]
    predictions = []
    for alpha in (0.6, 0.7, 0.8):
        for gamma in range(1, args.max_gamma + 1):
            e = metrics.expected_tokens_per_step(alpha, gamma)
            predictions.append({"alpha": alpha, "gamma": gamma, "expected_tokens": e,
                                "speedup_formula": metrics.predicted_speedup(alpha, gamma, c),
                                "speedup_measured_costs": e * verify_ms[1] / (gamma * draft_ms + verify_ms[gamma + 1])})
    bandwidth = measure_copy_bandwidth(device, 1024 if device.type == "cuda" else 128)
    document = {"schema": "egpt-speed/spec-cost/1", "env": capture_env(device, bandwidth),
                "config": {"model": args.model, "draft": draft.name, "dtype": str(dtype), "prefix_len": prefix_len,
                           "decode_position": base_len, "repeats": args.repeats},
                "target_forward_ms": verify_ms, "draft_step_ms": draft_ms, "cost_ratio": c, "predictions": predictions}
    stem = timestamped_name(f"spec_cost_{args.model}")
    out = args.out / f"{stem}.json"
    write_json_atomic(document, out)
    lines = [f"# Speculative cost model: {args.model} + draft {draft.name}", "",
             f"- device {document['env'].get('device_name')}, dtype {dtype}, prefix {prefix_len} tokens, decode position {base_len}",
             f"- command: `{document['env']['command']}`", "",
             "| tokens per target forward | median ms | × one-token cost |", "|---:|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {v / verify_ms[1]:.2f} |" for k, v in verify_ms.items()]
    lines += ["", f"- draft step {draft_ms:.3f} ms → cost ratio c = {c:.4f}", "",
              "| α | γ | E tokens/step | E/(γc+1) | with measured verify cost |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['alpha']} | {p['gamma']} | {p['expected_tokens']:.2f} | {p['speedup_formula']:.2f}× | {p['speedup_measured_costs']:.2f}× |"
              for p in predictions]
    write_text_atomic("\n".join(lines) + "\n", out.with_suffix(".md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
