"""Re-derive the speculative summaries of stored results from their per-sample counters (no re-run).

`mean_accepted_tokens` (τ) once divided new tokens by all target forwards, the prefill included;
it is now tokens per verification step (metrics.mean_accepted_tokens). This prints, per result file
and speculative run, the stored figure beside τ and tokens per target forward recomputed by
metrics.speculation_summary from the samples.

    python benchmarks/rederive_tau.py [benchmarks/results/*.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from egpt_speed.metrics import speculation_summary

RESULTS = Path(__file__).parent / "results"


def rederived_rows(path: Path) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(file, strategy, stored figure, τ, tokens per target forward) for each speculative run of one result."""
    document = json.loads(path.read_text())
    rows = []
    for name, run in document.get("runs", {}).items():
        stored = (run.get("summary") or {}).get("speculation")
        if not stored or not run.get("samples"):
            continue
        summary = speculation_summary(run["samples"])
        rows.append((path.name, name, stored.get("mean_accepted_tokens"), summary["mean_accepted_tokens"],
                     summary["tokens_per_target_forward"]))
    return rows


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths] or sorted(RESULTS.glob("*.json"))
    print("| result | strategy | stored (tokens / target forward) | τ (tokens / verify step) | tokens / target forward |")
    print("|---|---|---:|---:|---:|")
    for path in files:
        for file, name, stored, tau, per_forward in rederived_rows(path):
            cells = [f"{v:.2f}" if v is not None else "–" for v in (stored, tau, per_forward)]
            print(f"| {file} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
