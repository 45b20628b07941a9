"""Markdown tables and PNG charts rendered from a result document (never from printed text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from egpt_speed.results import STAGE_KEYS

STAGE_LABELS = {"stage1_ms": "Stage 1 load", "stage2_ms": "Stage 2 preprocess", "stage3_ms": "Stage 3 vision",
                "stage4_ms": "Stage 4 decode"}


def _f(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _gb(value: Any) -> str:
    return "–" if not value else f"{value / 1e9:.2f}"


def stage_table(summary: dict) -> list[str]:
    lines = ["| stage | mean ms | median ms | p90 ms | % of total |", "|---|---:|---:|---:|---:|"]
    for key in STAGE_KEYS:
        lines.append(f"| {STAGE_LABELS[key]} | {_f(summary.get(key), 2)} | {_f(summary.get(key + '_median'), 2)} | "
                     f"{_f(summary.get(key + '_p90'), 2)} | {_f(summary.get(key.replace('_ms', '_pct')), 1, ' %')} |")
    lines.append(f"| **total** | **{_f(summary.get('total_ms'), 2)}** | {_f(summary.get('total_ms_median'), 2)} | "
                 f"{_f(summary.get('total_ms_p90'), 2)} | 100 % |")
    return lines


def decode_lines(summary: dict) -> list[str]:
    return [
        f"- prefill (TTFT) {_f(summary.get('prefill_ms'), 2)} ms · decode {_f(summary.get('decode_ms'), 2)} ms",
        f"- tokens: mean {_f(summary.get('num_tokens'), 1)}, min {_f(summary.get('num_tokens_min'))}, "
        f"max {_f(summary.get('num_tokens_max'))}, std {_f(summary.get('num_tokens_std'), 1)}",
        f"- **{_f(summary.get('per_token_ms'), 2)} ms/token** (decode_ms / (tokens − 1), token-weighted) · "
        f"{_f(summary.get('tokens_per_s'), 1)} tokens/s · {_f(summary.get('samples_per_s'), 2)} samples/s",
        f"- LLM weights {_gb(summary.get('weight_bytes'))} GB{' (measured)' if summary.get('weight_bytes_measured') else ''} · "
        f"draft {_gb(summary.get('draft_bytes'))} GB · Stage-4 working memory {_gb(summary.get('stage4_working_bytes'))} GB · "
        f"device peak (all loaded models) {_gb(summary.get('stage4_peak_bytes'))} GB · "
        f"MBU {_f(100 * summary['mbu'] if summary.get('mbu') is not None else None, 1, ' %')}",
    ]


def speculation_lines(spec: dict) -> list[str]:
    positions = ", ".join(_f(a, 2) for a in spec.get("acceptance_by_position", []))
    return [
        f"- speculation: α (accept rate) {_f(spec.get('accept_rate'), 3)} · mean accepted tokens (incl. bonus) "
        f"{_f(spec.get('mean_accepted_tokens'), 2)} · target forwards {spec.get('target_forwards')} · "
        f"drafted {spec.get('drafted')} / accepted {spec.get('accepted')}",
        f"- acceptance by draft position: [{positions}] · cost ratio c {_f(spec.get('cost_ratio'), 3)} · "
        f"predicted speedup E/(γc+1) {_f(spec.get('predicted_speedup'), 2, '×')} with E from i.i.d. α, "
        f"{_f(spec.get('predicted_speedup_measured_e'), 2, '×')} with the measured E",
    ]


def comparison_table(comparisons: list[dict]) -> list[str]:
    lines = ["| candidate vs reference | Stage-4 speedup median [IQR] | total speedup median [IQR] | exact match | token match | first divergence (mean) | teacher-forced top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        lines.append(
            f"| {c['candidate']} vs {c['reference']} | {_f(c['speedup_stage4_median'], 2, '×')} "
            f"[{_f(c['speedup_stage4_q1'], 2)}–{_f(c['speedup_stage4_q3'], 2)}] | {_f(c['speedup_total_median'], 2, '×')} "
            f"[{_f(c['speedup_total_q1'], 2)}–{_f(c['speedup_total_q3'], 2)}] | {_f(100 * c['exact_match_rate'] if c['exact_match_rate'] is not None else None, 0, ' %')} | "
            f"{_f(100 * c['token_match_rate'] if c['token_match_rate'] is not None else None, 1, ' %')} | {_f(c['first_divergence_mean'], 1)} | "
            f"{_f(100 * c['teacher_forced_top1'] if c.get('teacher_forced_top1') is not None else None, 1, ' %')} |")
    return lines


def summary_table(runs: dict) -> list[str]:
    lines = ["| strategy | Stage 4 ms | prefill ms | ms/token | tokens/s | tokens | total ms | weights + working GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        s = run["summary"]
        lines.append(f"| {name} | {_f(s.get('stage4_ms'), 1)} | {_f(s.get('prefill_ms'), 1)} | {_f(s.get('per_token_ms'), 2)} | "
                     f"{_f(s.get('tokens_per_s'), 1)} | {_f(s.get('num_tokens'), 1)} | {_f(s.get('total_ms'), 1)} | {_gb(s.get('stage4_footprint_bytes'))} |")
    return lines


def render_markdown(document: dict) -> str:
    env, config, runs = document["env"], document["config"], document["runs"]
    lines = [f"# egpt-speed: {', '.join(runs)}", "",
             f"- command: `{env.get('command')}`",
             f"- device: {env.get('device_name')} ({env.get('device')}), driver {env.get('driver') or '–'}, "
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, bitsandbytes {env.get('bitsandbytes') or '–'}",
             f"- model {config['model']} · dtype {config.get('dtype_resolved', config['dtype'])} · attention {config.get('attn_implementation')} · "
             f"frames {config['frames']} ({config.get('event_tokens')} event tokens) · source {config['source']} · "
             f"data {config['data']} · {config['samples']} samples + {config['warmup']} warm-up (not counted) · "
             f"max_new_tokens {config['max_new_tokens']} · {'sampling' if config.get('do_sample') else 'greedy'}",
             f"- git {env.get('git_commit')} · {document.get('created')}"]
    if config.get("random_weights"):
        lines.append("- **random weights**: timings are honest for cost; token agreement and acceptance are not meaningful.")
    lines += ["", "## Summary", ""] + summary_table(runs)
    if document.get("comparisons"):
        lines += ["", "## Speedup and agreement (per-sample ratios, interleaved order)", ""]
        lines += comparison_table(document["comparisons"])
    for name, run in runs.items():
        summary = run["summary"]
        lines += ["", f"## {name}", "", run.get("description", ""), ""] + stage_table(summary) + [""] + decode_lines(summary)
        if summary.get("speculation"):
            lines += speculation_lines(summary["speculation"])
        if run.get("settings"):
            lines.append(f"- settings: `{run['settings']}`")
    lines += ["", "Timing protocol: device synchronised around every region, warm-up excluded, strategies "
              "interleaved per sample with alternating order, speedups are medians of per-sample ratios."]
    return "\n".join(lines) + "\n"


def write_plots(document: dict, path: Path) -> Path | None:
    """A stage-breakdown bar per strategy, and acceptance by draft position where there is one."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = document["runs"]
    speculative = {n: r["summary"]["speculation"] for n, r in runs.items() if r["summary"].get("speculation")}
    columns = 2 if speculative else 1
    figure, axes = plt.subplots(1, columns, figsize=(6 * columns, 3.5), squeeze=False)
    ax = axes[0][0]
    bottoms = [0.0] * len(runs)
    for key in STAGE_KEYS:
        values = [r["summary"].get(key) or 0.0 for r in runs.values()]
        ax.barh(list(runs), values, left=bottoms, label=STAGE_LABELS[key])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_xlabel("mean ms per sample")
    ax.set_title("Stage breakdown")
    ax.legend(fontsize=7)
    if speculative:
        ax = axes[0][1]
        for name, spec in speculative.items():
            rates = [r if r is not None else float("nan") for r in spec.get("acceptance_by_position", [])]
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.05)
        ax.set_title("Acceptance by draft position")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
