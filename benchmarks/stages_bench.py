"""Stages 1-3 with --preprocess cpu vs device on synthetic 10^6-event clips (issue 13).

    python benchmarks/stages_bench.py --model tiny --out benchmarks/results              # CUDA if present, else CPU
    python benchmarks/stages_bench.py --model synthetic-7b --dtype bfloat16 --out benchmarks/results

Clips are written once as EventGPT npy files; every repeat re-reads them from disk (the page cache
is warm after the first read; nothing is cached in the process). Per clip the two modes alternate
order. Writes stages_bench_<model>_<device>_<stamp>.json/.md: median ms of each stage per mode, the
max pixel-value difference device vs cpu (normalised units, fp32), and the max event-feature
difference in the run dtype. Stage 3 runs through `--vision-mode` (auto: a CUDA graph on CUDA);
`--stage3-modes` also times Stage 3 alone under each listed vision mode on the first clip, and
`--profile` writes `<stem>_profile.txt`: one device-preprocess sample under torch.profiler with a
range per stage (what each remaining millisecond is), and the kernels of one eager Stage-3 forward
(which attention kernel runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed.datasets import discover_samples  # noqa: E402
from egpt_speed.events import SyntheticClipConfig, synthesize_clip  # noqa: E402
from egpt_speed.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from egpt_speed.results import capture_env, timestamped_name, write_json_atomic, write_text_atomic  # noqa: E402
from egpt_speed.stages import preprocess_pixel_diff, stage1_load, stage2_preprocess, stage3_vision  # noqa: E402
from egpt_speed.timing import TimedRegion, median_ms  # noqa: E402
from egpt_speed.vision_graph import FrameEncoder, use_vision_mode, vision_facts  # noqa: E402

MODES = ("cpu", "device")
STAGES = ("stage1_ms", "stage2_ms", "stage3_ms")


def write_clips(folder: Path, clips: int, events: int, seed: int) -> list:
    for index in range(clips):
        stream = synthesize_clip(SyntheticClipConfig(num_events=events), seed=seed + index)
        record = {"x": stream.x.astype(np.uint16), "y": stream.y.astype(np.uint16), "t": stream.t,
                  "p": stream.p.astype(np.uint8), **stream.meta}
        np.save(folder / f"clip_{index:03d}.npy", record, allow_pickle=True)
    return discover_samples(folder)


def one_sample(spec, model, frames: int, mode: str, device: torch.device) -> tuple[dict, torch.Tensor]:
    with TimedRegion(device) as r1, torch.profiler.record_function("stage1_load"):
        loaded = stage1_load(spec, "npy", frames)
    with TimedRegion(device) as r2, torch.profiler.record_function(f"stage2_preprocess_{mode}"):
        pre = stage2_preprocess(loaded, model, frames, mode)
    with TimedRegion(device) as r3, torch.profiler.record_function("stage3_vision"):
        encoded = stage3_vision(pre, model)
    return {"stage1_ms": r1.ms, "stage2_ms": r2.ms, "stage3_ms": r3.ms}, encoded.event_features


def run(args, model, specs, device) -> tuple[dict, float]:
    times = {mode: [] for mode in MODES}
    feature_diff = 0.0
    for _ in range(args.warmup):
        for mode in MODES:
            one_sample(specs[0], model, args.frames, mode, device)
    for repeat in range(args.repeats):
        for index, spec in enumerate(specs):
            order = MODES if (repeat + index) % 2 == 0 else MODES[::-1]
            features = {}
            for mode in order:
                record, features[mode] = one_sample(spec, model, args.frames, mode, device)
                times[mode].append(record)
            feature_diff = max(feature_diff, float((features["cpu"].float() - features["device"].float()).abs().max()))
    return times, feature_diff


def summarise(records: list[dict]) -> dict:
    out = {key: statistics.median(r[key] for r in records) for key in STAGES}
    out["stages_1_3_ms"] = statistics.median(sum(r[key] for key in STAGES) for r in records)
    return out


def stage3_by_mode(args, model, spec, device) -> tuple[dict[str, float], dict[str, float]]:
    """Stage 3 alone on the first clip's device-preprocessed frames, per vision mode → (median ms,
    max |features − eager features| in the run dtype)."""
    pre = stage2_preprocess(stage1_load(spec, "npy", args.frames), model, args.frames, "device")
    with torch.inference_mode():
        eager = model.encode_frames(pre.pixel_values).float()
    times, diffs = {}, {}
    for mode in args.stage3_modes:
        encoder = FrameEncoder(model.encode_frames, mode, device)
        times[mode] = median_ms(lambda: encoder(pre.pixel_values), device, args.repeats * len(args.stage3_modes) + 5)
        diffs[mode] = float((encoder(pre.pixel_values).float() - eager).abs().max())
    return times, diffs


ATTENTION_KERNEL = ("flash", "fmha", "attention", "efficient", "sdpa", "cudnn")


def profile(args, model, spec, device, path: Path) -> list[str]:
    """A device-preprocess sample and an eager Stage-3 forward under torch.profiler → the attention kernels seen."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    with torch_profile(activities=activities) as whole:
        one_sample(spec, model, args.frames, "device", device)
    pre = stage2_preprocess(stage1_load(spec, "npy", args.frames), model, args.frames, "device")
    with torch_profile(activities=activities) as eager, torch.inference_mode():
        model.encode_frames(pre.pixel_values)
    text = [f"# one sample, --preprocess device, vision mode {vision_facts(model)['vision_mode']} (sorted by {sort})",
            whole.key_averages().table(sort_by=sort, row_limit=40),
            f"# one eager Stage-3 forward (tower + projector + adaptor), sorted by {sort}",
            eager.key_averages().table(sort_by=sort, row_limit=30)]
    path.write_text("\n\n".join(text))
    names = {event.key for event in eager.key_averages()}
    return sorted(n for n in names if any(k in n.lower() for k in ATTENTION_KERNEL))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--frames", type=int, default=5, choices=(5, 1))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--vision-mode", default="auto", help="Stage 3's frame encoder: auto | eager | graph | compile")
    parser.add_argument("--stage3-modes", type=lambda v: [m for m in v.split(",") if m], default=["eager", "graph"],
                        help="vision modes Stage 3 is also timed alone under (comma-separated; '' for none)")
    parser.add_argument("--profile", action="store_true", help="write <stem>_profile.txt (torch.profiler)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.model, dtype, device)
    use_vision_mode(model, args.vision_mode)
    stem = timestamped_name(f"stages_bench_{args.model}_{device.type}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stages-bench-") as tmp:
        specs = write_clips(Path(tmp), args.clips, args.events, seed=1000)
        pixel_diff = preprocess_pixel_diff(stage1_load(specs[0], "npy", args.frames), model, args.frames)
        times, feature_diff = run(args, model, specs, device)
        stage3_modes, stage3_diffs = stage3_by_mode(args, model, specs[0], device)
        kernels = profile(args, model, specs[0], device, args.out / f"{stem}_profile.txt") if args.profile else None
    document = {
        "schema": "egpt-speed/stages-bench/1", "env": capture_env(device, None),
        "config": {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "events": args.events,
                   "clips": args.clips, "repeats": args.repeats, "frames": args.frames,
                   "torch_threads": torch.get_num_threads(),
                   **vision_facts(model), "vision_dtype": str(next(model.vision_tower.parameters()).dtype)},
        "stage3_ms_by_vision_mode": stage3_modes, "stage3_max_diff_vs_eager": stage3_diffs,
        "stage3_attention_kernels": kernels,
        "stage1_note": "Stage 1 re-reads the npy from disk every sample (page cache warm), no caching in the process",
        "preprocess_max_pixel_diff": pixel_diff, "event_feature_max_diff": feature_diff,
        "summary": {mode: summarise(times[mode]) for mode in MODES}, "samples": times,
    }
    out = args.out / f"{stem}.json"
    write_json_atomic(document, out)
    write_text_atomic(markdown(document), out.with_suffix(".md"))
    print(markdown(document))


def markdown(document: dict) -> str:
    config, env = document["config"], document["env"]
    lines = [f"# Stages 1-3, --preprocess cpu vs device ({config['model']}, {env['device']}, {config['dtype']})", "",
             f"- command: `{env['command']}`",
             f"- {config['clips']} synthetic clips x {config['repeats']} repeats, {config['events']:,} events, "
             f"{config['frames']} frames; torch threads {config['torch_threads']}; "
             f"Stage 3: vision mode {config['vision_mode']}, attention {config['vision_attention']}, "
             f"{config['vision_dtype']}; attention kernels seen: {document['stage3_attention_kernels']}",
             f"- max pixel-value difference device vs cpu (normalised, fp32, first clip): "
             f"{document['preprocess_max_pixel_diff']:g}",
             f"- max event-feature difference ({config['dtype']}): {document['event_feature_max_diff']:g}", "",
             "| preprocess | Stage 1 ms | Stage 2 ms | Stage 3 ms | Stages 1-3 ms |", "|---|---:|---:|---:|---:|"]
    for mode, s in document["summary"].items():
        lines.append(f"| {mode} | {s['stage1_ms']:.1f} | {s['stage2_ms']:.1f} | {s['stage3_ms']:.1f} | "
                     f"{s['stages_1_3_ms']:.1f} |")
    if document["stage3_ms_by_vision_mode"]:
        diffs = document.get("stage3_max_diff_vs_eager", {})
        lines += ["", "| Stage 3 alone (first clip), vision mode | median ms | max abs diff vs eager |", "|---|---:|---:|"]
        lines += [f"| {mode} | {ms:.2f} | {diffs.get(mode, float('nan')):g} |"
                  for mode, ms in document["stage3_ms_by_vision_mode"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
