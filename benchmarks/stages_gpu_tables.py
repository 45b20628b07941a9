"""Tables for benchmarks/stages_gpu.sh (issue 13) from `egpt-speed run` results made with --preprocess cpu and device.

    python benchmarks/stages_gpu_tables.py agreement CPU.json DEVICE.json OUT_STEM
    python benchmarks/stages_gpu_tables.py four-stage CPU.json DEVICE.json OUT_STEM

`agreement`: per sample, are the token ids of the same strategy equal under both modes (goal: ≥ 95 %
of samples); every other sample with its first divergence. `four-stage`: median ms of each stage,
Stages 1–3 and the total per mode, and the share of Stages 1–3. Each writes OUT_STEM.json and .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("stage1_ms", "stage2_ms", "stage3_ms", "stage4_ms", "total_ms")
AGREEMENT_GOAL = 0.95


def only_run(path: Path) -> tuple[dict, dict]:
    document = json.loads(path.read_text())
    (run,) = document["runs"].values()
    return document, run


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(cpu_path: Path, device_path: Path) -> dict:
    (cpu_doc, cpu), (dev_doc, dev) = only_run(cpu_path), only_run(device_path)
    pairs = list(zip(cpu["samples"], dev["samples"]))
    if any(a["id"] != b["id"] for a, b in pairs):
        raise SystemExit("the two runs did not decode the same samples in the same order")
    differing = [{"id": a["id"], "first_divergence": first_divergence(a["token_ids"], b["token_ids"]),
                  "cpu_tokens": len(a["token_ids"]), "device_tokens": len(b["token_ids"])}
                 for a, b in pairs if a["token_ids"] != b["token_ids"]]
    equal = len(pairs) - len(differing)
    return {"samples": len(pairs), "equal": equal, "equal_rate": equal / len(pairs) if pairs else None,
            "goal": AGREEMENT_GOAL, "met": bool(pairs) and equal / len(pairs) >= AGREEMENT_GOAL,
            "differing": differing, "preprocess_max_pixel_diff": dev_doc["config"].get("preprocess_max_pixel_diff"),
            "strategy": next(iter(dev_doc["runs"])), "model": dev_doc["config"]["model"],
            "dtype": dev_doc["config"].get("dtype_resolved"), "device": dev_doc["env"].get("device"),
            "files": [cpu_path.name, device_path.name]}


def agreement_md(result: dict) -> str:
    lines = [f"# --preprocess cpu vs device: token agreement ({result['strategy']}, {result['model']}, "
             f"{result['dtype']}, {result['device']})", "",
             f"- samples with identical token ids: **{result['equal']} / {result['samples']}** "
             f"({result['equal_rate']:.0%}; goal ≥ {result['goal']:.0%}: {'met' if result['met'] else 'NOT met'})",
             f"- max pixel-value difference device vs cpu (first sample, normalised): {result['preprocess_max_pixel_diff']}",
             f"- from {', '.join(result['files'])}"]
    if result["differing"]:
        lines += ["", "| sample | first divergence | tokens cpu / device |", "|---|---:|---|"]
        lines += [f"| {d['id']} | {d['first_divergence']} | {d['cpu_tokens']} / {d['device_tokens']} |"
                  for d in result["differing"]]
    return "\n".join(lines) + "\n"


def four_stage(cpu_path: Path, device_path: Path) -> dict:
    rows = {}
    for mode, path in (("cpu", cpu_path), ("device", device_path)):
        document, run = only_run(path)
        summary = run["summary"]
        row = {key: summary[f"{key}_median"] for key in STAGES}
        row["stages_1_3_ms"] = row["stage1_ms"] + row["stage2_ms"] + row["stage3_ms"]
        row["stages_1_3_share"] = row["stages_1_3_ms"] / row["total_ms"]
        row["samples"] = len(run["samples"])
        row["vision_mode"] = document["config"].get("vision_mode")
        rows[mode] = row
    document, run = only_run(device_path)
    return {"model": document["config"]["model"], "dtype": document["config"].get("dtype_resolved"),
            "strategy": next(iter(document["runs"])), "events": document["config"].get("synthetic_events"),
            "device": document["env"].get("device"), "modes": rows, "files": [cpu_path.name, device_path.name]}


def four_stage_md(result: dict) -> str:
    lines = [f"# Four stages, --preprocess cpu vs device ({result['strategy']}, {result['model']}, {result['dtype']}, "
             f"{result['events']:,} events, {result['device']})", "", "Medians per stage (the total's median is "
             "its own, not the sum of the stage medians).", "",
             "| --preprocess | samples | Stage 1 | Stage 2 | Stage 3 | Stages 1–3 | Stage 4 | total | Stages 1–3 share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in result["modes"].items():
        lines.append(f"| {mode} | {r['samples']} | {r['stage1_ms']:.1f} | {r['stage2_ms']:.1f} | {r['stage3_ms']:.1f} | "
                     f"**{r['stages_1_3_ms']:.1f}** | {r['stage4_ms']:.1f} | {r['total_ms']:.1f} | "
                     f"{r['stages_1_3_share']:.1%} |")
    lines += ["", f"- Stage 3 vision mode: {result['modes']['device']['vision_mode']}; from {', '.join(result['files'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    kind, cpu_path, device_path, stem = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    build, render = {"agreement": (agreement, agreement_md), "four-stage": (four_stage, four_stage_md)}[kind]
    result = build(cpu_path, device_path)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main(sys.argv[1:])
