"""The terminal summary of a result: two tables that fit 100 columns, and a noise warning."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from egpt_speed.report import _f, left_out_notes, over_fastest_autoregressive

WIDTH = 100  # headers are abbreviated so numbers are never cut at this width
NOISY_BELOW_SAMPLES = 5
NOISY_IQR = 0.25  # an IQR reaching beyond ±25 % of the median


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=index > 0)
    return table


def runs_table(document: dict) -> Table:
    table = _table("means; ms/tok = decode / (tokens − 1); S1–S4 = stages, ms",
                   ("strategy", "S1", "S2", "S3", "S4", "S4 %", "prefill", "ms/tok", "tok/s", "tokens"))
    for name, run in document["runs"].items():
        s = run["summary"]
        table.add_row(name, _f(s.get("stage1_ms"), 2), _f(s.get("stage2_ms"), 2), _f(s.get("stage3_ms"), 2),
                      _f(s.get("stage4_ms"), 1), _f(s.get("stage4_pct"), 1), _f(s.get("prefill_ms"), 1),
                      _f(s.get("per_token_ms"), 2), _f(s.get("tokens_per_s"), 1), _f(s.get("num_tokens"), 1))
    return table


def comparisons_table(document: dict) -> Table:
    reference = document["comparisons"][0]["reference"]
    over = over_fastest_autoregressive(document)
    vs_ar = f"; vs AR = S4 vs {next(iter(over.values())).autoregressive}" if over else ""
    table = _table(f"vs {reference}: median per-sample ratio [IQR]{vs_ar}; τ = mean accepted tokens",
                   ("candidate", "S4 speedup", "total", "exact", "tok match", "α", "τ") + (("vs AR",) if over else ()))
    for c in document["comparisons"]:
        spec = document["runs"][c["candidate"]]["summary"].get("speculation") or {}
        ar_ratio = (f"{_f(over[c['candidate']].median, 2)}×" if c["candidate"] in over else "–",) if over else ()
        table.add_row(c["candidate"],
                      f"{_f(c['speedup_stage4_median'], 2)}× [{_f(c['speedup_stage4_q1'], 2)}–{_f(c['speedup_stage4_q3'], 2)}]",
                      f"{_f(c['speedup_total_median'], 2)}×", f"{_f(100 * c['exact_match_rate'], 0)} %",
                      f"{_f(100 * c['token_match_rate'], 1)} %", _f(spec.get("accept_rate"), 3),
                      _f(spec.get("mean_accepted_tokens"), 2), *ar_ratio)
    return table


def noise_note(document: dict) -> str | None:
    """One line when the speedups cannot be trusted to two digits: few samples or a wide IQR."""
    counted = min((run["summary"].get("samples") or 0 for run in document["runs"].values()), default=0)
    wide = [c["candidate"] for c in document["comparisons"] if _wide(c)]
    if counted >= NOISY_BELOW_SAMPLES and not wide:
        return None
    why = f"only {counted} counted samples" if counted < NOISY_BELOW_SAMPLES else \
        f"the speedup IQR of {', '.join(wide)} is wider than ±{NOISY_IQR:.0%}"
    return (f"note: the ratios are noisy ({why}); tighten them with more samples (-n 20 or more) "
            "on a quieter machine (nothing else running).")


def _wide(comparison: dict) -> bool:
    median, q1, q3 = (comparison.get(k) for k in ("speedup_stage4_median", "speedup_stage4_q1", "speedup_stage4_q3"))
    if not median or q1 is None or q3 is None:
        return False
    return q1 < median * (1 - NOISY_IQR) or q3 > median * (1 + NOISY_IQR)


def real_divergence_warning(document: dict) -> str | None:
    """One loud line when a candidate chose a token the reference clearly did not prefer (not a bf16 near-tie)."""
    real = [f"{c['candidate']} ({c['real_divergence_count']})" for c in document["comparisons"]
            if c.get("real_divergence_count")]
    if not real:
        return None
    return (f"WARNING: real divergences from {document['comparisons'][0]['reference']}: {', '.join(real)} — "
            "not explained by rounding; see the report's REAL DIVERGENCES section.")


def print_summary(document: dict, console: Console | None = None) -> None:
    console = console or Console(width=WIDTH)
    console.print(runs_table(document))
    if document["comparisons"]:
        console.print(comparisons_table(document))
    for line in (*(f"WARNING: {note}" for note in left_out_notes(document)), real_divergence_warning(document),
                 noise_note(document)):
        if line:
            console.print(line, soft_wrap=True, markup=False, highlight=False)
