"""Merge `run baseline` results of the three model families into one four-stage table, and summarise
cross-modal `compare baseline speculative` results (α by draft position, the draft's own Stages 1–3,
speedup). Used by benchmarks/families_gpu.sh; writes <out>/table.md and <out>/families.json.

    python benchmarks/families_table.py OUT --runs R1.json R2.json R3.json --cross X1.json [X2.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODALITY = {"eventgpt": "events (5 rendered frames, pooled)", "llava": "1 RGB frame", "video_llava": "8 RGB frames"}
STAGES = ("stage1_ms", "stage2_ms", "stage3_ms", "stage4_ms")


def _f(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean(samples: list[dict], key: str):
    values = [s[key] for s in samples if s.get(key) is not None]
    return sum(values) / len(values) if values else None


def stage_row(document: dict) -> dict:
    """One workload's figures from a `run baseline` result."""
    config, (run,) = document["config"], document["runs"].values()
    summary, samples = run["summary"], run["samples"]
    row = {"model": config["model"], "family": config.get("model_family", "eventgpt"),
           "dtype": config.get("dtype_resolved", config["dtype"]), "preprocess": config.get("preprocess"),
           "samples": summary["samples"], "visual_tokens": _mean(samples, "event_tokens"),
           "prefill_tokens": _mean(samples, "prompt_tokens"), "new_tokens": _mean(samples, "num_tokens"),
           "prefill_ms": summary.get("prefill_ms"), "per_token_ms": summary.get("per_token_ms"),
           "total_ms": summary.get("total_ms"), "device": document["env"].get("device_name"),
           "command": document["env"].get("command")}
    row.update({key: summary.get(key) for key in STAGES})
    stages123 = sum(summary.get(key) or 0.0 for key in STAGES[:3])
    row["stages123_share"] = stages123 / row["total_ms"] if row["total_ms"] else None
    return row


def stage_table(rows: list[dict]) -> list[str]:
    lines = ["| workload (model, input) | visual / prefill tokens | new tokens | Stage 1 | Stage 2 (where) | Stage 3 | "
             "Stage 4 | prefill (TTFT) | ms/token | total | Stages 1–3 share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['family']}: {MODALITY.get(r['family'], '?')}) | {_f(r['visual_tokens'], 0)} / "
                     f"{_f(r['prefill_tokens'], 0)} | {_f(r['new_tokens'], 1)} | {_f(r['stage1_ms'])} | "
                     f"{_f(r['stage2_ms'])} ({r['preprocess']}) | {_f(r['stage3_ms'])} | {_f(r['stage4_ms'])} | "
                     f"{_f(r['prefill_ms'])} | {_f(r['per_token_ms'], 2)} | {_f(r['total_ms'])} | "
                     f"{_f(100 * r['stages123_share'] if r['stages123_share'] is not None else None, 0)} % |")
    return lines


def cross_row(document: dict) -> dict:
    """A cross-modal speculative run: α by position, the draft's own Stages 1–3, speedups vs the baseline."""
    run = document["runs"]["speculative"]
    spec = run["summary"].get("speculation") or {}
    comparison = next(c for c in document["comparisons"] if c["candidate"] == "speculative")
    settings = run.get("settings") or {}
    return {"target": document["config"]["model"], "target_family": document["config"].get("model_family"),
            "draft": settings.get("draft"), "draft_family": settings.get("draft_family"),
            "accept_rate": spec.get("accept_rate"), "tau": spec.get("mean_accepted_tokens"),
            "acceptance_by_position": spec.get("acceptance_by_position"),
            "draft_stage123_ms": _mean(run["samples"], "draft_stage123_ms"),
            "draft_stage3_ms": _mean(run["samples"], "draft_stage3_ms"),
            "target_stage3_ms": run["summary"].get("stage3_ms"),
            "speedup_stage4": comparison.get("speedup_stage4_median"), "speedup_total": comparison.get("speedup_total_median"),
            "exact_match_rate": comparison.get("exact_match_rate"), "command": document["env"].get("command")}


def cross_table(rows: list[dict]) -> list[str]:
    lines = ["| target ← draft | α | τ | α by draft position | draft Stages 1–3 (Stage 3) ms | target Stage 3 ms | "
             "speedup Stage 4 / total | exact |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        positions = ", ".join(_f(a, 2) for a in r["acceptance_by_position"] or [])
        lines.append(f"| {r['target']} ({r['target_family']}) ← {r['draft']} ({r['draft_family']}) | {_f(r['accept_rate'], 3)} | "
                     f"{_f(r['tau'], 2)} | [{positions}] | {_f(r['draft_stage123_ms'])} ({_f(r['draft_stage3_ms'])}) | "
                     f"{_f(r['target_stage3_ms'])} | {_f(r['speedup_stage4'], 2)}× / {_f(r['speedup_total'], 2)}× | "
                     f"{_f(100 * r['exact_match_rate'] if r['exact_match_rate'] is not None else None, 0)} % |")
    return lines


def markdown(rows: list[dict], cross: list[dict]) -> str:
    lines = ["# Three model families through the same four stages", "",
             f"Device: {rows[0]['device'] if rows else '–'} · {rows[0]['dtype'] if rows else ''} · HF generate baseline, "
             "greedy. **Different workloads**: each model reads its own input (events / one frame / eight frames) "
             "and its own prompt, and random weights answer with different lengths, so compare stage costs "
             "(and ms/token), not totals. Random weights: cost only, not answers.", ""]
    lines += stage_table(rows)
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    if cross:
        lines += ["", "## Cross-modal speculative decoding (each model reads its own view of the sample)", "",
                  "The draft's Stages 1–3 run inside Stage 4 and are charged to it. SmolLM2-135M real weights shared by "
                  "both sides (`tiny` ↔ `tiny-video-llava`), random vision towers: α reflects the shared language "
                  "model, not trained EventGPT / Video-LLaVA checkpoints.", ""]
        lines += cross_table(cross)
        lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in cross]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", nargs="*", type=Path, default=[])
    parser.add_argument("--cross", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    rows = [stage_row(json.loads(p.read_text())) for p in args.runs]
    cross = [cross_row(json.loads(p.read_text())) for p in args.cross]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "families.json").write_text(json.dumps({"stages": rows, "cross_modal": cross}, indent=1))
    text = markdown(rows, cross)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
