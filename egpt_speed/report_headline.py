"""The compare plot's headline panel: per strategy, the end-to-end speedup beside the Stage-4 one, and
how much of its sample Stages 1–3 take — once Stage 4 is fast, that share is where the next millisecond is."""

from __future__ import annotations

from dataclasses import dataclass

STAGES_1_3 = ("stage1_pct", "stage2_pct", "stage3_pct")


@dataclass(frozen=True)
class HeadlineRow:
    name: str
    speedup_stage4: float | None  # median of per-sample ratios vs the reference
    speedup_total: float | None  # the same, end to end (Stages 1–4)
    stages_1_3_share: float | None  # Stages 1–3 mean / total mean, 0..1


def stages_1_3_share(summary: dict) -> float | None:
    parts = [summary.get(key) for key in STAGES_1_3]
    return sum(parts) / 100.0 if all(p is not None for p in parts) else None


def headline_rows(document: dict) -> list[HeadlineRow]:
    """The reference (1.00×) first, then each candidate in the order compared."""
    runs = document["runs"]
    reference = document.get("config", {}).get("reference") or next(iter(runs))
    rows = [HeadlineRow(reference, 1.0, 1.0, stages_1_3_share(runs[reference]["summary"]))]
    for c in document.get("comparisons", []):
        summary = runs.get(c["candidate"], {}).get("summary", {})
        rows.append(HeadlineRow(c["candidate"], c.get("speedup_stage4_median"), c.get("speedup_total_median"),
                                stages_1_3_share(summary)))
    return rows


def plot_headline(ax, document: dict) -> None:
    """Paired bars per strategy (Stage 4, end to end), each row labelled with its Stages 1–3 share."""
    rows = headline_rows(document)
    height = 0.38
    for i, row in enumerate(rows):
        ax.barh(i - height / 2, row.speedup_stage4 or 0.0, height=height, color="tab:blue",
                label="Stage 4" if i == 0 else None)
        ax.barh(i + height / 2, row.speedup_total or 0.0, height=height, color="tab:orange",
                label="end to end (Stages 1–4)" if i == 0 else None)
        share = "–" if row.stages_1_3_share is None else f"{row.stages_1_3_share:.0%}"
        text = f" {_x(row.speedup_stage4)} / {_x(row.speedup_total)} · Stages 1–3 = {share} of the sample"
        ax.text(max(row.speedup_stage4 or 0.0, row.speedup_total or 0.0), i, text, va="center", fontsize=7)
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.6 * max([r.speedup_stage4 or 0.0 for r in rows] + [r.speedup_total or 0.0 for r in rows] + [1.0]))
    ax.set_xlabel("median per-sample speedup vs the reference")
    ax.set_title("Stage-4 vs end-to-end speedup, and the share of Stages 1–3")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"
