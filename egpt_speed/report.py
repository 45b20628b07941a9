"""Markdown tables and PNG charts rendered from a result document (never from printed text).

Besides the tables, a compare report ranks the candidates (Stage-4 and end-to-end speedup,
agreement, memory), flags comparisons too noisy to rank, prints real divergences loudly and ends
with recommendations computed from the measurements. `merge_documents` joins result files of
one device and one sample set into a single ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egpt_speed import metrics
from egpt_speed.errors import EgptError
from egpt_speed.report_headline import plot_headline
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


def left_out_notes(document: dict) -> list[str]:
    """One sentence per candidate that failed in warm-up and was left out of the run."""
    return [f"{name} failed in warm-up and is left out of this result: {reason} (run it alone with --debug for the "
            "traceback)" for name, reason in document.get("left_out", {}).items()]


def left_out_lines(document: dict) -> list[str]:
    notes = left_out_notes(document)
    return (["", "## Left out", ""] + [f"- {note}" for note in notes]) if notes else []


def render_markdown(document: dict, memory_budget_gb: float | None = None) -> str:
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
    for source in document.get("merged_from", []):
        lines.append(f"- merged: {source['label']} · `{source.get('command')}` · git {source.get('git_commit')} · {source.get('created')}")
    lines += divergence_lines(document)
    lines += left_out_lines(document)
    lines += ["", "## Summary", ""] + summary_table(runs)
    if document.get("comparisons"):
        lines += ["", "## Ranking (median of per-sample ratios vs the same-run reference)", ""] + ranking_table(ranking(document))
        lines += ["", "Memory: LLM weights + draft + Stage-4 working memory where measured (CUDA), else the device peak, "
                  "else the weights alone. Lossless: declared lossless and no `real` divergence (bf16 near-ties allowed)."]
        over = over_fastest_autoregressive(document)
        if over:
            lines += ["", "## Speculation over the fastest autoregressive strategy (same run)", "",
                      "Median of per-sample Stage-4 ratios against the fastest lossless, unbatched, non-speculative "
                      "strategy of this run; per step = per target forward.", ""] + speculation_table(document, over)
        lines += ["", "## Recommendations", ""] + recommendations(document, memory_budget_gb)
        lines += ["", "## Speedup and agreement (per-sample ratios, interleaved order)", ""]
        lines += comparison_table(document["comparisons"])
    lines += agreement_summary_lines(document)
    lines += cross_modal_lines(document)
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


def plot_title(document: dict) -> str:
    env, config = document["env"], document["config"]
    return (f"{config.get('model')} · {env.get('device_name')} ({env.get('device')}) · "
            f"{config.get('dtype_resolved', config.get('dtype'))} · {config.get('samples')} samples")


def plot_stages(ax, runs: dict) -> None:
    """Grouped bars per stage on a log axis, so Stages 1–3 stay readable beside a dominant Stage 4."""
    names = list(runs)
    height = 0.8 / len(STAGE_KEYS)
    for k, key in enumerate(STAGE_KEYS):
        values = [runs[n]["summary"].get(key) or 0.0 for n in names]
        positions = [i + (k - (len(STAGE_KEYS) - 1) / 2) * height for i in range(len(names))]
        ax.barh(positions, values, height=height, label=STAGE_LABELS[key])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("mean ms per sample (log scale)")
    ax.set_title("Stage breakdown")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)


def plot_speedups(ax, rows: list[Ranked]) -> None:
    """Stage-4 median speedup with its IQR, end-to-end as a marker; lossy and noisy rows told apart by colour/hatch."""
    names = [r.name for r in rows]
    for i, row in enumerate(rows):
        color = "tab:green" if row.lossless else "tab:red"
        ax.barh(i, row.speedup_stage4 or 0.0, color=color, alpha=0.45 if not row.rankable else 0.9,
                hatch="//" if not row.rankable else None)
        if row.noise is not None and row.speedup_stage4:
            q1 = row.speedup_stage4 * (1 + (row.noise.low or 0.0))
            q3 = row.speedup_stage4 * (1 + (row.noise.high or 0.0))
            ax.plot([q1, q3], [i, i], color="black", linewidth=1)
        if row.speedup_total:
            ax.plot(row.speedup_total, i, marker="D", color="black", markersize=4)
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs reference (bar: Stage 4 + IQR, ◆: end to end)")
    ax.set_title("Speedup (green lossless, red lossy, hatched: too noisy)")


def plot_pareto(ax, rows: list[Ranked]) -> None:
    """Speedup vs memory; the frontier joins the rows no other row beats on both."""
    points = [(r.memory_bytes / 1e9, r.speedup_stage4, r) for r in rows if r.memory_bytes and r.speedup_stage4]
    for gb, speedup, row in points:
        ax.scatter(gb, speedup, marker="o" if row.lossless else "x", color="tab:green" if row.lossless else "tab:red")
        ax.annotate(row.name, (gb, speedup), fontsize=7, xytext=(3, 3), textcoords="offset points")
    frontier = sorted(((gb, s) for gb, s, _ in points if not any(g2 <= gb and s2 > s for g2, s2, _ in points)))
    if len(frontier) > 1:
        ax.plot(*zip(*frontier), color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(left=0)  # from zero: a 5 % memory difference must not look like a factor
    ax.set_ylim(bottom=0)
    ax.set_xlabel("memory GB (weights + draft + Stage-4 working)")
    ax.set_ylabel("Stage-4 speedup")
    ax.set_title("Pareto: speedup vs memory (o lossless, x lossy)")
    if not points:
        ax.text(0.5, 0.5, "memory not measured on this device", ha="center", va="center", transform=ax.transAxes)


def plot_acceptance(ax, speculative: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    for name, spec in speculative.items():
        rates = [r if r is not None else float("nan") for r in spec.get("acceptance_by_position", [])]
        ax.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by draft position")
    ax.legend(fontsize=7, loc="upper right")


def write_plots(document: dict, path: Path) -> Path | None:
    """Stage breakdown (log), and for a compare: the headline (Stage-4 vs end-to-end speedup, share of
    Stages 1–3) first, speedups, the speedup-vs-memory Pareto, acceptance by position."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = document["runs"]
    speculative = {n: r["summary"]["speculation"] for n, r in runs.items() if r["summary"].get("speculation")}
    compared = ["headline", "speedups", "pareto"] if document.get("comparisons") else []
    panels = compared[:1] + ["stages"] + compared[1:] + (["acceptance"] if speculative else [])
    columns = min(len(panels), 2)
    rows_count = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows_count, columns, figsize=(6.5 * columns, 4.2 * rows_count), squeeze=False)
    ranked = ranking(document) if document.get("comparisons") else []
    for ax, panel in zip(axes.flat, panels):
        if panel == "headline":
            plot_headline(ax, document)
        elif panel == "stages":
            plot_stages(ax, runs)
        elif panel == "speedups":
            plot_speedups(ax, ranked)
        elif panel == "pareto":
            plot_pareto(ax, ranked)
        else:
            plot_acceptance(ax, speculative)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(plot_title(document), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---- noise, ranking, recommendations ------------------------------------------------------------------

NOISE_BAND = 0.25  # a comparison whose IQR leaves median × (1 ± NOISE_BAND) is too noisy to rank
MIN_RANKED_SAMPLES = 5
SLOW_DRAFT_GAMMA_C = 0.2  # γ·c above this: drafting alone costs a fifth of a target step or more
SLOW_VERIFY = 1.25  # a verify forward costing this many reference decode steps breaks the cost model's 1×
LOW_ACCEPT = 0.5
SHORTFALL = 1.1  # predicted / measured above this asks for an explanation


@dataclass(frozen=True)
class Noise:
    """Spread of the per-sample Stage-4 ratios of one comparison."""

    samples: int
    low: float | None  # q1 / median − 1 (negative)
    high: float | None  # q3 / median − 1
    too_noisy: bool
    reason: str | None


def noise(comparison: dict) -> Noise:
    """Too noisy to rank: fewer than MIN_RANKED_SAMPLES samples, or an IQR wider than ±NOISE_BAND of the median."""
    count = comparison.get("samples") or len(comparison.get("per_sample", []))
    median, q1, q3 = (comparison.get(k) for k in ("speedup_stage4_median", "speedup_stage4_q1", "speedup_stage4_q3"))
    low = q1 / median - 1 if median and q1 is not None else None
    high = q3 / median - 1 if median and q3 is not None else None
    if count < MIN_RANKED_SAMPLES:
        return Noise(count, low, high, True, f"only {count} samples (fewer than {MIN_RANKED_SAMPLES})")
    if low is None or high is None:
        return Noise(count, low, high, True, "no Stage-4 ratios")
    if low < -NOISE_BAND or high > NOISE_BAND:
        return Noise(count, low, high, True,
                     f"IQR {100 * low:+.0f} % / {100 * high:+.0f} % of the median, wider than ±{100 * NOISE_BAND:.0f} %")
    return Noise(count, low, high, False, None)


@dataclass(frozen=True)
class Ranked:
    """One strategy's row in the ranking (the reference included, at 1.00×)."""

    name: str
    speedup_stage4: float | None
    speedup_total: float | None
    exact_match_rate: float | None
    lossless_rate: float | None  # lossless up to numerics (None where the result predates the diagnosis)
    real_divergences: int | None
    declared_lossless: bool
    weights_bytes: int | None  # LLM + draft
    memory_bytes: int | None  # weights + draft + Stage-4 working memory (else the device peak, else weights)
    noise: Noise | None
    is_reference: bool = False

    @property
    def lossless(self) -> bool:
        """Declared lossless and shown so: no real divergence (older results: every sample exact)."""
        if not self.declared_lossless:
            return False
        if self.is_reference or self.real_divergences is not None:
            return not self.real_divergences
        return self.exact_match_rate == 1.0

    @property
    def rankable(self) -> bool:
        return self.is_reference or (self.noise is not None and not self.noise.too_noisy)


def _memory(summary: dict) -> tuple[int | None, int | None]:
    weights = summary.get("weight_bytes")
    weights = weights + (summary.get("draft_bytes") or 0) if weights else None
    memory = summary.get("stage4_footprint_bytes") or summary.get("stage4_peak_bytes") or weights
    return weights, memory


def ranking(document: dict) -> list[Ranked]:
    """Rankable rows by Stage-4 speedup (fastest first), then the rows too noisy to rank."""
    runs = document["runs"]
    reference = document.get("config", {}).get("reference") or next(iter(runs))
    rows = [Ranked(reference, 1.0, 1.0, None, None, None, bool(runs[reference].get("lossless", True)),
                   *_memory(runs[reference]["summary"]), None, True)]
    for c in document.get("comparisons", []):
        run = runs.get(c["candidate"], {})
        rows.append(Ranked(c["candidate"], c.get("speedup_stage4_median"), c.get("speedup_total_median"),
                           c.get("exact_match_rate"), c.get("lossless_up_to_numerics_rate"),
                           c.get("real_divergence_count"), bool(run.get("lossless", True)),
                           *_memory(run.get("summary", {})), noise(c)))
    key = lambda r: -(r.speedup_stage4 or 0.0)  # noqa: E731
    return sorted((r for r in rows if r.rankable), key=key) + sorted((r for r in rows if not r.rankable), key=key)


# ---- speculation against the fastest autoregressive strategy -------------------------------------------


def is_speculative(run: dict) -> bool:
    """Drafts and verifies: its samples count drafted tokens, or its summary has a mean accepted length."""
    summary = run.get("summary", {})
    if "mean_accepted_tokens" in summary or "mean_accepted_tokens" in (summary.get("speculation") or {}):
        return True
    return any("drafted" in sample for sample in run.get("samples", []))


def is_batched(run: dict) -> bool:
    """Decoded several prompts at once (its Stage-4 times are whole batches', not one sample's)."""
    if run.get("summary", {}).get("batches"):
        return True
    return any((sample.get("batch_size") or 1) > 1 for sample in run.get("samples", []))


def fastest_autoregressive(document: dict) -> str | None:
    """The lossless, unbatched, non-speculative run with the highest median Stage-4 speedup over the reference."""
    runs = document["runs"]
    rows = [r for r in ranking(document) if r.lossless and r.speedup_stage4 is not None
            and not is_speculative(runs[r.name]) and not is_batched(runs[r.name])]
    return max(rows, key=lambda r: r.speedup_stage4).name if rows else None


@dataclass(frozen=True)
class OverAutoregressive:
    """A speculative candidate's Stage-4 speedup over the fastest lossless autoregressive run of the same document."""

    autoregressive: str
    candidate: str
    samples: int  # samples with a ratio
    median: float | None  # median over samples i of stage4_ms[autoregressive][i] / stage4_ms[candidate][i]
    q1: float | None
    q3: float | None


def over_fastest_autoregressive(document: dict) -> dict[str, OverAutoregressive]:
    """Every speculative run against the fastest autoregressive one, by per-sample Stage-4 ratios (samples
    aligned by index, as the runner interleaves them); empty when the run has no such pair."""
    runs = document["runs"]
    autoregressive = fastest_autoregressive(document)
    if autoregressive is None:
        return {}
    base = runs[autoregressive].get("samples", [])
    result = {}
    for name, run in runs.items():
        if name == autoregressive or not is_speculative(run):
            continue
        ratios = [metrics.ratio(b.get("stage4_ms"), c.get("stage4_ms")) for b, c in zip(base, run.get("samples", []))]
        q = metrics.quantiles(ratios)
        result[name] = OverAutoregressive(autoregressive, name, sum(r is not None for r in ratios),
                                          q.get("median"), q.get("q1"), q.get("q3"))
    return result


def _per_verify_step(summary: dict, key: str) -> float | None:
    """A per-sample mean time (draft_ms, verify_ms) as ms per target forward."""
    forwards = (summary.get("speculation") or {}).get("target_forwards")
    if summary.get(key) is None or not forwards or not summary.get("samples"):
        return None
    return summary[key] * summary["samples"] / forwards


def speculation_table(document: dict, over: dict[str, OverAutoregressive]) -> list[str]:
    """Each speculative candidate against the fastest autoregressive run and the reference, with its cost decomposition."""
    runs, rows = document["runs"], {r.name: r for r in ranking(document)}
    autoregressive = next(iter(over.values())).autoregressive
    reference = document.get("config", {}).get("reference") or next(iter(runs))
    lines = [f"| candidate | vs fastest AR ({autoregressive}) median [IQR] | vs {reference} | τ (tokens per verify step) | "
             "draft ms per step | verify ms per step | predicted E/(γc+1), measured E |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, o in over.items():
        summary = runs[name]["summary"]
        spec = summary.get("speculation") or {}
        fused = (runs[name].get("settings") or {}).get("fused_step")  # one graph: draft time is inside the step's
        draft = "in the step (fused)" if fused else _f(_per_verify_step(summary, 'draft_ms'), 2)
        lines.append(f"| {name} | **{_f(o.median, 2, '×')}** [{_f(o.q1, 2)}–{_f(o.q3, 2)}] | "
                     f"{_f(rows[name].speedup_stage4 if name in rows else None, 2, '×')} | "
                     f"{_f(spec.get('mean_accepted_tokens'), 2)} | {draft} | "
                     f"{_f(_per_verify_step(summary, 'verify_ms'), 2)} | {_f(spec.get('predicted_speedup_measured_e'), 2, '×')} |")
    return lines


def _pct(value: float | None, digits: int = 0) -> str:
    return _f(100 * value if value is not None else None, digits, " %")


def ranking_table(rows: list[Ranked]) -> list[str]:
    lines = ["| rank | strategy | Stage-4 speedup | end-to-end speedup | exact match | lossless up to numerics | "
             "real divergences | weights GB | memory GB | noise |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    rank = 0
    for row in rows:
        rank += row.rankable
        kind = "lossless" if row.lossless else ("lossy" if not row.declared_lossless else "**not shown lossless**")
        spread = "reference" if row.is_reference else (
            f"too noisy to rank: {row.noise.reason}" if row.noise.too_noisy
            else f"IQR {100 * row.noise.low:+.0f} / {100 * row.noise.high:+.0f} %")
        lines.append(f"| {rank if row.rankable else '–'} | {row.name} ({kind}) | {_f(row.speedup_stage4, 2, '×')} | "
                     f"{_f(row.speedup_total, 2, '×')} | {_pct(row.exact_match_rate)} | {_pct(row.lossless_rate)} | "
                     f"{_f(row.real_divergences)} | {_gb(row.weights_bytes)} | {_gb(row.memory_bytes)} | {spread} |")
    return lines


def speculation_shortfall(document: dict, candidate: str, measured: float | None) -> str | None:
    """Why a speculative candidate's measured Stage-4 speedup falls short of its cost model, from its counters.

    The cost model (E / (γc + 1), E measured) assumes a verify forward costs one reference decode
    step and the draft costs c of it; each assumption is checked against the measured times.
    """
    run = document["runs"].get(candidate, {})
    summary = run.get("summary", {})
    spec = summary.get("speculation") or {}
    predicted = spec.get("predicted_speedup_measured_e") or spec.get("predicted_speedup")
    if not predicted or not measured or predicted <= measured * SHORTFALL:
        return None
    gamma = (run.get("settings") or {}).get("gamma") or document.get("config", {}).get("gamma") or 1
    c = spec.get("cost_ratio")
    reasons = []
    if c is not None and gamma * c > SLOW_DRAFT_GAMMA_C:
        share = _draft_share(summary)
        reasons.append(f"the draft is too slow: γ·c = {gamma * c:.2f}"
                       + (f" (drafting is {100 * share:.0f} % of Stage 4)" if share is not None else "")
                       + "; use a cheaper draft (an EAGLE head from `train-draft`), a smaller --gamma, or compile it")
    verify = _verify_cost(document, summary, spec)
    if verify is not None and verify > SLOW_VERIFY:
        reasons.append(f"one verify forward costs {verify:.2f}× a reference decode step (the model assumes 1×): "
                       "the device is compute-bound at this width; try a smaller --gamma or fewer --tree-nodes")
    if spec.get("accept_rate") is not None and spec["accept_rate"] < LOW_ACCEPT:
        reasons.append(f"acceptance is low (α = {spec['accept_rate']:.2f}): train a draft head on your clips and "
                       "questions (`egpt-speed train-draft`)")
    if not reasons:
        reasons.append("neither the draft nor the verify forward explains it: the per-step overhead of the loop "
                       "(cache crops, host syncs) does; try `compile+` this strategy")
    return (f"{candidate}: predicted {predicted:.2f}× but measured {measured:.2f}× — " + "; ".join(reasons) + ".")


def _draft_share(summary: dict) -> float | None:
    draft, verify = summary.get("draft_ms"), summary.get("verify_ms")
    stage4 = summary.get("stage4_ms")
    if draft is None or not stage4:
        return None
    return draft / stage4 if verify is None else draft / max(stage4, draft + verify)


def _verify_cost(document: dict, summary: dict, spec: dict) -> float | None:
    """Mean verify time per target forward / the reference's ms per decoded token."""
    reference = document["runs"].get(document.get("config", {}).get("reference") or next(iter(document["runs"])), {})
    ref_token_ms = reference.get("summary", {}).get("per_token_ms")
    forwards, samples = spec.get("target_forwards"), summary.get("samples")
    if summary.get("verify_ms") is None or not forwards or not samples or not ref_token_ms:
        return None
    return summary["verify_ms"] * samples / forwards / ref_token_ms


def memory_budget_of(document: dict, memory_budget_gb: float | None) -> float | None:
    """The budget passed to `report`, else the one the run recorded (`--memory-budget`)."""
    if memory_budget_gb is not None:
        return memory_budget_gb
    config = document.get("config", {})
    return config.get("memory_budget_gb") or (config.get("options") or {}).get("memory_budget_gb")


def _describe(row: Ranked) -> str:
    agreement = "reference" if row.is_reference else (
        f"exact {_pct(row.exact_match_rate)}, lossless up to numerics {_pct(row.lossless_rate)}")
    return (f"**{row.name}** — {_f(row.speedup_stage4, 2, '×')} Stage 4, {_f(row.speedup_total, 2, '×')} end to end, "
            f"{agreement}, {_gb(row.memory_bytes)} GB")


def recommendations(document: dict, memory_budget_gb: float | None = None) -> list[str]:
    """Bullet lines computed from the ranking: fastest lossless, fastest within the budget, speculative shortfalls."""
    rows = ranking(document)
    rankable = [r for r in rows if r.rankable]
    lines = []
    lossless = [r for r in rankable if r.lossless]
    if lossless:
        lines.append(f"- Fastest lossless: {_describe(lossless[0])}.")
    over = [o for o in over_fastest_autoregressive(document).values() if o.median is not None]
    if over:
        best = max(over, key=lambda o: o.median)
        lines.append(f"- Best speculation over the fastest autoregressive strategy ({best.autoregressive}): **{best.candidate}** "
                     f"{_f(best.median, 2, '×')} (median of per-sample Stage-4 ratios).")
    lossy_faster = [r for r in rankable if not r.lossless and lossless and (r.speedup_stage4 or 0) > (lossless[0].speedup_stage4 or 0)]
    if lossy_faster:
        lines.append(f"- Faster but not lossless: {_describe(lossy_faster[0])}; use it only where its answers are acceptable.")
    budget = memory_budget_of(document, memory_budget_gb)
    if budget is not None:
        fits = [r for r in rankable if r.memory_bytes is not None and r.memory_bytes <= budget * 1e9]
        lines.append(f"- Fastest within {budget:g} GB: {_describe(fits[0])}{'' if fits[0].lossless else ' (lossy)'}."
                     if fits else f"- Nothing measured fits in {budget:g} GB (memory unknown on this device or too large).")
    noisy = [r.name for r in rows if not r.rankable]
    if noisy:
        lines.append(f"- Too noisy to rank: {', '.join(noisy)} — run more samples (`-n`) on a quieter machine.")
    for row in rows:
        if not row.is_reference:
            why = speculation_shortfall(document, row.name, row.speedup_stage4)
            if why:
                lines.append(f"- {why}")
    return lines or ["- Nothing to recommend: no candidate was compared."]


def divergence_lines(document: dict) -> list[str]:
    """Every real divergence, loudly; near-ties counted. Lossless strategies must have none."""
    lines = []
    for c in document.get("comparisons", []):
        real = [d for d in c.get("divergences", []) if d.get("kind") == "real"]
        if not real:
            continue
        lossless = document["runs"].get(c["candidate"], {}).get("lossless", True)
        lines.append(f"- **{c['candidate']}: {len(real)} REAL divergence{'s' * (len(real) > 1)}**"
                     + (" — a lossless strategy changed the answer beyond rounding: a bug, not numerics" if lossless
                        else " (lossy strategy: expected)"))
        for d in real:
            lines.append(f"  - sample {d['id']} at token {d['position']}: chose {d.get('candidate_token')} where the reference "
                         f"chose {d.get('reference_token')}; gap to top-1 {_f(d.get('candidate_logit_gap'), 3)} > "
                         f"tolerance {_f(d.get('tolerance'), 3)} (top-1/top-2 margin {_f(d.get('margin'), 3)})")
    return (["", "## ⚠ REAL DIVERGENCES", ""] + lines) if lines else []


def cross_modal_lines(document: dict) -> list[str]:
    """Speculative runs whose draft reads its own modality (another family): α by position, the draft's own
    Stages 1–3 (charged to Stage 4) and the measured speedup over the reference."""
    speedups = {c["candidate"]: c for c in document.get("comparisons", [])}
    rows = []
    for name, run in document["runs"].items():
        settings = run.get("settings") or {}
        if not settings.get("draft_own_stages"):
            continue
        samples = run.get("samples", [])
        stage123 = [s["draft_stage123_ms"] for s in samples if s.get("draft_stage123_ms") is not None]
        stage3 = [s["draft_stage3_ms"] for s in samples if s.get("draft_stage3_ms") is not None]
        spec = run["summary"].get("speculation") or {}
        positions = ", ".join(_f(a, 2) for a in spec.get("acceptance_by_position", []))
        comparison = speedups.get(name, {})
        rows.append(f"| {name} | {settings.get('draft_family')} `{Path(str(settings.get('draft'))).name}` | "
                    f"{_f(spec.get('accept_rate'), 3)} | {_f(spec.get('mean_accepted_tokens'), 2)} | [{positions}] | "
                    f"{_f(sum(stage123) / len(stage123) if stage123 else None)} ({_f(sum(stage3) / len(stage3) if stage3 else None)}) | "
                    f"{_f(comparison.get('speedup_stage4_median'), 2, '×')} / {_f(comparison.get('speedup_total_median'), 2, '×')} |")
    if not rows:
        return []
    return ["", "## Cross-modal drafting", "",
            f"The draft reads its own view of each sample (the target, {document['config'].get('model_family')}, reads "
            "its own); the draft's Stages 1–3 run inside Stage 4 and are charged to it. Speedups: median of per-sample "
            "ratios vs the reference, Stage 4 / total.", "",
            "| strategy | draft | α | τ | α by draft position | draft Stages 1–3 ms (Stage 3) | speedup Stage 4 / total |",
            "|---|---|---:|---:|---|---:|---:|"] + rows


def agreement_summary_lines(document: dict) -> list[str]:
    lines = []
    for c in document.get("comparisons", []):
        if "real_divergence_count" in c:
            found = c.get("divergences", [])
            ties = sum(1 for d in found if d.get("kind") == "near_tie")
            lines.append(f"- {c['candidate']}: {len(found)} divergent samples, {ties} near-tie, "
                         f"{c['real_divergence_count']} real · lossless up to numerics {_pct(c.get('lossless_up_to_numerics_rate'))}")
    floor = document.get("numerical_floor")
    if floor:
        lines.append(f"- numerical floor (`--fp32-check`): the reference differs from its float32 re-run on "
                     f"{floor.get('differs_from_fp32')} of {floor.get('samples')} samples "
                     f"({_pct(floor.get('token_match_rate_vs_fp32'), 1)} of tokens equal, "
                     f"{floor.get('real_divergence_count', 0)} real); judge bf16 candidates against this. {floor.get('note', '')}")
    if lines:
        lines.append("- near_tie: the candidate's token is within the dtype's rounding of the reference's top-1 there "
                     "(fed the reference's own prefix); real: farther than rounding can explain.")
    return (["", "## Agreement diagnosis", ""] + lines) if lines else []


# ---- merging result files ---------------------------------------------------------------------------

SAME_SAMPLES_KEYS = ("model", "data", "samples", "seed", "frames", "source", "max_new_tokens", "do_sample",
                     "dtype_resolved", "synthetic_events")


def _sample_ids(document: dict) -> list:
    reference = document.get("config", {}).get("reference") or next(iter(document["runs"]))
    return [s.get("id") for s in document["runs"][reference].get("samples", [])]


def check_mergeable(documents: list[dict], labels: list[str]) -> None:
    """Refuse files from different devices, sample sets or references, naming the first difference."""
    first, label = documents[0], labels[0]
    for document, other in zip(documents[1:], labels[1:]):
        for key in ("device", "device_name"):
            if first["env"].get(key) != document["env"].get(key):
                raise EgptError(f"{other} ran on {document['env'].get(key)!r} but {label} on {first['env'].get(key)!r}; "
                                "merge only results of one device.")
        for key in SAME_SAMPLES_KEYS:
            if first["config"].get(key) != document["config"].get(key):
                raise EgptError(f"{other} has {key} = {document['config'].get(key)!r} but {label} has "
                                f"{first['config'].get(key)!r}; merge only results of the same samples and settings.")
        if _sample_ids(first) != _sample_ids(document):
            raise EgptError(f"{other} counted other samples than {label}; merge only results of the same samples.")
        if first["config"].get("reference") != document["config"].get("reference"):
            raise EgptError(f"{other} compares against {document['config'].get('reference')!r} but {label} against "
                            f"{first['config'].get('reference')!r}; merge only results with one reference.")


def merge_documents(documents: list[dict], labels: list[str] | None = None) -> dict:
    """One document ranking the candidates of several result files of one device and sample set.

    Each comparison keeps its own same-run ratios (a candidate is only ever divided by the
    reference it was interleaved with). A candidate present in several files keeps every
    comparison, the later ones renamed `name [label]`. Raises EgptError when the files differ in
    device, samples, settings or reference.
    """
    if not documents:
        raise EgptError("name at least one result file to report.")
    labels = labels or [f"file {i + 1}" for i in range(len(documents))]
    check_mergeable(documents, labels)
    merged = {**documents[0], "runs": dict(documents[0]["runs"]), "comparisons": list(documents[0].get("comparisons", [])),
              "merged_from": [{"label": label, "created": d.get("created"), "command": d["env"].get("command"),
                               "git_commit": d["env"].get("git_commit")} for d, label in zip(documents, labels)]}
    reference = documents[0]["config"].get("reference")
    for document, label in zip(documents[1:], labels[1:]):
        for c in document.get("comparisons", []):
            name = c["candidate"] if c["candidate"] not in merged["runs"] else f"{c['candidate']} [{label}]"
            merged["runs"][name] = document["runs"][c["candidate"]]
            merged["comparisons"].append({**c, "candidate": name, "reference": reference})
    return merged


def merge_result_files(paths: list[Path]) -> dict:
    """Load each result file (schema checked) and merge them; labels are the file names."""
    from egpt_speed.results import load_result

    return merge_documents([load_result(Path(p)) for p in paths], [Path(p).name for p in paths])
