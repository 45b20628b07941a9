"""Static-batching sweep: throughput, per-sample latency and agreement with batch 1 for N = 1, 2, 4, 8, 16, 32.

Run on the GPU machine:
    python benchmarks/batch_sweep.py --model synthetic-7b --samples 64 --max-new-tokens 64 --out benchmarks/results
Writes batch_sweep_<model>_<stamp>.json (schema egpt-speed/1 plus a "sweep" table) and a .md beside it.
One model load; every batch size is a `batch` strategy state in one `run_samples` loop (the
package's runner: Stages 1–3 once per sample, warm-up batches dropped), so all sizes decode the
same samples. Agreement is against the smallest size (batch 1 by default) through
`results.compare`; on random weights in bf16 it is low by nature (flat logits), in float32 exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed.baselines import runner  # noqa: E402
from egpt_speed.baselines.runner import RunConfig  # noqa: E402
from egpt_speed import metrics, report, results  # noqa: E402
from egpt_speed.decoding import GenerationSettings  # noqa: E402
from egpt_speed.errors import EgptError  # noqa: E402
from egpt_speed.timing import measure_copy_bandwidth  # noqa: E402
from egpt_speed.strategies import registry  # noqa: E402

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32)


def sweep(model: str, data: str, sizes: list[int], samples: int, warmup: int, max_new_tokens: int, device: str,
          dtype: str, out: Path, seed: int = 0, frames: int = 5, synthetic_events: int = 200_000,
          vision_tower: Path | None = None) -> Path:
    """Run the sweep; returns the JSON path (the .md is beside it)."""
    sizes = sorted(set(sizes))
    if not sizes or sizes[0] < 1:
        raise EgptError("--sizes must be positive integers, e.g. 1,2,4,8.")
    config = RunConfig(strategies=["batch"], model=model, data=data, samples=samples, warmup=warmup,
                       max_new_tokens=max_new_tokens, dtype=dtype, device=device, batch_size=sizes[-1], seed=seed,
                       frames=frames, synthetic_events=synthetic_events, vision_tower=vision_tower)
    runner.validate(config)
    ctx = runner.context_for(config)
    strategies = [registry.build("batch", dataclasses.replace(ctx, batch_size=size)) for size in sizes]
    specs = runner.resolve_samples(config)
    plan = runner.warmup_then_counted(specs, config.samples, config.warmup)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, seed=seed)
    torch.manual_seed(seed)
    base, states = runner.prepare_states(config, ctx, strategies, runner.load_for(config, ctx))
    bandwidth = measure_copy_bandwidth(ctx.device, megabytes=1024 if ctx.device.type == "cuda" else 128)
    runner.run_samples(config, base, states, plan, settings, leave_out=False)  # every size, or the error

    names = [f"batch@{size}" for size in sizes]
    runs = {}
    for name, state in zip(names, states):
        summary = results.summarize(state.records)
        summary.update(runner.batch_summary(state.records))
        runs[name] = {"description": state.strategy.summary, "lossless": True, "settings": state.strategy.settings(),
                      "summary": summary, "samples": state.records}
    comparisons = [results.compare(names[0], name, states[0].records, state.records)
                   for name, state in zip(names[1:], states[1:])]
    reference_rate = runs[names[0]]["summary"]["batch_tokens_per_s"]
    rows = []
    for size, name in zip(sizes, names):
        summary = runs[name]["summary"]
        agreement = next((c for c in comparisons if c["candidate"] == name), None)
        rows.append({"batch_size": size, "batches": summary["batches"],
                     "batch_tokens_per_s": summary["batch_tokens_per_s"],
                     "throughput_vs_reference": metrics.ratio(summary["batch_tokens_per_s"], reference_rate),
                     "latency_stage4_ms_median": summary.get("stage4_ms_median"),
                     "prefill_ms_median": summary.get("prefill_ms_median"),
                     "stage4_peak_bytes": summary.get("stage4_peak_bytes"),
                     "exact_match_rate": agreement["exact_match_rate"] if agreement else 1.0,
                     "token_match_rate": agreement["token_match_rate"] if agreement else 1.0})
    first = states[0].records[0] if states[0].records else {}
    document = {
        "schema": results.SCHEMA, "kind": "batch_sweep", "created": datetime.now().isoformat(timespec="seconds"),
        "env": results.capture_env(ctx.device, bandwidth),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
                   "sizes": sizes, "reference": names[0], "dtype_resolved": str(ctx.dtype).replace("torch.", ""),
                   "attn_implementation": base.llm.config._attn_implementation, "random_weights": base.random_weights,
                   "event_tokens": first.get("event_tokens"), "prompt_tokens": first.get("prompt_tokens")},
        "runs": runs, "comparisons": comparisons, "sweep": rows,
    }
    stem = results.timestamped_name(f"batch_sweep_{Path(model).name}")
    json_path = Path(out) / f"{stem}.json"
    results.write_json_atomic(document, json_path)
    results.write_text_atomic(render_sweep(document) + "\n" + report.render_markdown(document), json_path.with_suffix(".md"))
    return json_path


def render_sweep(document: dict) -> str:
    """The sweep table, from the document only."""
    config, env = document["config"], document["env"]
    f = report._f
    lines = [f"# Static batching sweep — {config['model']} on {env.get('device_name')}", "",
             f"`{env.get('command')}`", "",
             f"{config['samples']} samples (+{config['warmup']} warm-up, not counted), max_new_tokens "
             f"{config['max_new_tokens']}, {config['dtype_resolved']}, greedy. Throughput = Σ new tokens / Σ batch Stage-4 "
             f"time; latency = a sample's Stage-4 time = its batch's. Agreement vs {config['reference']}."
             + (" Random weights: agreement here says nothing about real outputs." if config.get("random_weights") else ""),
             "", "| batch | batches | tokens/s | × vs ref | latency ms (median) | prefill ms (median) | peak GB | exact match | token match |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in document["sweep"]:
        peak = row["stage4_peak_bytes"] / 1e9 if row["stage4_peak_bytes"] else None
        lines.append(f"| {row['batch_size']} | {row['batches']} | {f(row['batch_tokens_per_s'], 1)} | "
                     f"{f(row['throughput_vs_reference'], 2)} | {f(row['latency_stage4_ms_median'], 1)} | "
                     f"{f(row['prefill_ms_median'], 1)} | {f(peak, 2)} | {f(100 * row['exact_match_rate'], 0)} % | "
                     f"{f(100 * row['token_match_rate'], 1)} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="EventGPT checkpoint dir or preset (tiny, synthetic-7b).")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated batch sizes")
    parser.add_argument("--samples", type=int, default=64, help="counted samples (≥ the largest size for a full batch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-tower", type=Path, default=None, help="local CLIP dir overriding mm_visual_tower")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"error: --sizes {args.sizes!r} is not a comma-separated list of integers.")
    try:
        path = sweep(args.model, args.data, sizes, args.samples, args.warmup, args.max_new_tokens, args.device,
                     args.dtype, args.out, seed=args.seed, frames=args.frames, vision_tower=args.vision_tower)
    except EgptError as error:
        sys.exit(f"error: {error}")
    print(render_sweep(results.load_result(path)))
    print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
