"""Reports that rank and recommend: hand-built result documents, no model."""

from __future__ import annotations

import copy
import json

import pytest

from egpt_speed import report
from egpt_speed.errors import EgptError

GB = 10 ** 9


def run(weights_gb: float, lossless: bool = True, per_token_ms: float = 20.0, speculation: dict | None = None,
        **summary) -> dict:
    base = {"stage1_ms": 1.0, "stage2_ms": 30.0, "stage3_ms": 30.0, "stage4_ms": 1000.0, "total_ms": 1061.0,
            "per_token_ms": per_token_ms, "weight_bytes": int(weights_gb * GB), "stage4_footprint_bytes": int(weights_gb * GB),
            "samples": 8}
    if speculation:
        base["speculation"] = speculation
    base.update(summary)
    return {"description": "", "lossless": lossless, "settings": {}, "summary": base,
            "samples": [{"id": f"s{i}"} for i in range(8)]}


def comparison(candidate: str, speedup: float, spread: float = 0.05, samples: int = 8, exact: float = 1.0,
               real: int | None = 0, total: float | None = None) -> dict:
    keys = {"reference": "baseline", "candidate": candidate, "samples": samples, "speedup_stage4_median": speedup,
            "speedup_stage4_q1": speedup * (1 - spread), "speedup_stage4_q3": speedup * (1 + spread),
            "speedup_total_median": total or speedup * 0.9, "speedup_total_q1": None, "speedup_total_q3": None,
            "exact_match_rate": exact, "token_match_rate": exact, "first_divergence_mean": None,
            "teacher_forced_top1": None}
    if real is not None:
        keys.update(real_divergence_count=real, lossless_up_to_numerics_rate=1 - real / samples,
                    divergences=[{"id": f"s{i}", "position": 3, "kind": "real", "margin": 2.0, "candidate_logit_gap": 9.0,
                                  "tolerance": 0.5, "reference_token": 7, "candidate_token": 8} for i in range(real)])
    return keys


def document(**extra_runs) -> dict:
    runs = {"baseline": run(13.5), "compile": run(13.5), "nf4": run(3.8, lossless=False),
            "speculative": run(13.7), "eagle-tree": run(14.0)}
    comparisons = [comparison("compile", 5.2), comparison("nf4", 1.4, exact=0.4, real=3),
                   comparison("speculative", 2.4, exact=0.6), comparison("eagle-tree", 2.8, spread=0.4)]
    return {"schema": "egpt-speed/1", "created": "2026-11-28T08:00:00",
            "env": {"device": "cuda", "device_name": "NVIDIA H200", "command": "egpt-speed compare ...", "git_commit": "abc"},
            "config": {"model": "tiny", "data": "synthetic", "samples": 8, "seed": 0, "frames": 5, "source": "npy",
                       "max_new_tokens": 64, "do_sample": False, "dtype": "auto", "dtype_resolved": "bfloat16",
                       "warmup": 2, "reference": "baseline", "synthetic_events": 200000},
            "runs": {**runs, **extra_runs}, "comparisons": comparisons}


def test_ranking_orders_rankable_rows_by_stage4_speedup_and_puts_noisy_ones_last():
    rows = report.ranking(document())
    assert [r.name for r in rows] == ["compile", "speculative", "nf4", "baseline", "eagle-tree"]
    assert rows[-1].noise.too_noisy and "IQR" in rows[-1].noise.reason
    assert rows[1].lossless  # 60 % exact in bf16 but no real divergence: lossless up to numerics
    assert not rows[2].lossless  # nf4 is lossy
    assert rows[0].memory_bytes == int(13.5 * GB)


def test_noise_flags_few_samples_and_a_wide_iqr_but_not_a_tight_one():
    assert report.noise(comparison("x", 2.0, samples=4)).too_noisy
    assert report.noise(comparison("x", 2.0, spread=0.3)).too_noisy
    tight = report.noise(comparison("x", 2.0, spread=0.2))
    assert not tight.too_noisy and tight.low == pytest.approx(-0.2)


def test_a_lossless_strategy_with_a_real_divergence_is_not_ranked_lossless():
    doc = document()
    doc["comparisons"][0] = comparison("compile", 5.2, exact=0.9, real=1)
    compile_row = next(r for r in report.ranking(doc) if r.name == "compile")
    assert not compile_row.lossless
    markdown = report.render_markdown(doc)
    assert "REAL DIVERGENCE" in markdown and "a bug, not numerics" in markdown
    assert "Fastest lossless: **speculative**" in markdown


def test_recommendations_name_the_fastest_lossless_and_the_fastest_within_the_budget():
    lines = report.recommendations(document(), memory_budget_gb=5)
    assert lines[0].startswith("- Fastest lossless: **compile**")
    assert any(line.startswith("- Fastest within 5 GB: **nf4**") and "(lossy)" in line for line in lines)
    assert any("Too noisy to rank: eagle-tree" in line for line in lines)
    assert any("Nothing measured fits" in line for line in report.recommendations(document(), memory_budget_gb=1))


def test_a_recorded_budget_is_used_when_report_gets_none():
    doc = document()
    doc["config"]["options"] = {"memory_budget_gb": 5}
    assert any("Fastest within 5 GB" in line for line in report.recommendations(doc))


def speculative_doc(cost_ratio: float, accept_rate: float, verify_ms: float) -> dict:
    doc = document()
    spec = {"accept_rate": accept_rate, "cost_ratio": cost_ratio, "predicted_speedup_measured_e": 3.5,
            "target_forwards": 8 * 20, "mean_accepted_tokens": 3.2}
    doc["runs"]["speculative"] = run(13.7, speculation=spec, verify_ms=verify_ms, draft_ms=400.0)
    doc["runs"]["speculative"]["settings"] = {"gamma": 4}
    return doc


def test_a_speculative_shortfall_blames_a_slow_draft():
    why = report.speculation_shortfall(speculative_doc(0.3, 0.8, 20 * 20.0), "speculative", 2.4)
    assert "the draft is too slow: γ·c = 1.20" in why and "verify" not in why


def test_a_speculative_shortfall_blames_an_expensive_verify_or_low_acceptance():
    # 20 forwards per sample at 60 ms each against 20 ms per reference token: 3× the model's 1×
    why = report.speculation_shortfall(speculative_doc(0.01, 0.3, 20 * 60.0), "speculative", 2.4)
    assert "costs 3.00× a reference decode step" in why and "acceptance is low" in why
    assert report.speculation_shortfall(speculative_doc(0.01, 0.9, 400.0), "speculative", 3.4) is None


def test_merge_joins_candidates_of_two_files_into_one_ranking():
    first, second = document(), document()
    second["runs"] = {"baseline": run(13.5), "pld": run(13.5)}
    second["comparisons"] = [comparison("pld", 1.7), comparison("baseline", 1.0)][:1]
    second["runs"]["compile"] = run(13.5)
    second["comparisons"].append(comparison("compile", 5.0))
    merged = report.merge_documents([first, second], ["a.json", "b.json"])
    names = [r.name for r in report.ranking(merged)]
    assert "pld" in names and "compile [b.json]" in names and names[0] == "compile"
    assert [m["label"] for m in merged["merged_from"]] == ["a.json", "b.json"]
    assert "merged: b.json" in report.render_markdown(merged)


@pytest.mark.parametrize("where, key, value, reason", [
    ("env", "device_name", "NVIDIA H100 80GB HBM3", "one device"),
    ("config", "samples", 20, "same samples"),
    ("config", "dtype_resolved", "float32", "same samples and settings"),
    ("config", "reference", "compile", "one reference"),
])
def test_merge_refuses_mixed_devices_samples_and_references(where, key, value, reason):
    other = document()
    other[where][key] = value
    with pytest.raises(EgptError, match=reason):
        report.merge_documents([document(), other], ["a.json", "b.json"])


def test_merge_refuses_other_sample_ids():
    other = document()
    other["runs"]["baseline"]["samples"][0]["id"] = "elsewhere"
    with pytest.raises(EgptError, match="other samples"):
        report.merge_documents([document(), other])


def test_merge_result_files_reads_and_checks_each_file(tmp_path):
    paths = []
    for index, doc in enumerate([document(), document()]):
        path = tmp_path / f"r{index}.json"
        path.write_text(json.dumps(doc))
        paths.append(path)
    merged = report.merge_result_files(paths)
    assert len(merged["comparisons"]) == 8
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EgptError, match="not an egpt-speed result"):
        report.merge_result_files([paths[0], tmp_path / "bad.json"])


def test_markdown_diagnosis_and_floor_sections():
    doc = copy.deepcopy(document())
    doc["numerical_floor"] = {"samples": 8, "differs_from_fp32": 3, "token_match_rate_vs_fp32": 0.8,
                              "real_divergence_count": 0, "note": "a second, float32 copy"}
    markdown = report.render_markdown(doc)
    assert "## Ranking" in markdown and "## Recommendations" in markdown
    assert "differs from its float32 re-run on 3 of 8 samples" in markdown
    assert "nf4: 3 REAL divergences** (lossy strategy: expected)" in markdown


def test_plots_render_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    doc = speculative_doc(0.1, 0.7, 400.0)
    doc["runs"]["speculative"]["summary"]["speculation"]["acceptance_by_position"] = [0.9, 0.7, 0.5, 0.3]
    path = report.write_plots(doc, tmp_path / "plot.png")
    assert path.exists() and path.stat().st_size > 10_000


def ar_doc() -> dict:
    """baseline (reference), compile (fastest lossless AR), a faster lossy and a faster batched run, two speculative ones."""
    def timed(stage4: list[float], lossless: bool = True, **sample) -> dict:
        entry = run(0.5, lossless=lossless)
        entry["samples"] = [{"id": f"s{i}", "stage4_ms": ms, **sample} for i, ms in enumerate(stage4)]
        return entry

    doc = document()
    doc["config"]["samples"] = 5
    doc["runs"] = {"baseline": timed([100.0] * 5), "compile": timed([20.0] * 5),
                   "int4wo+compile": timed([10.0] * 5, lossless=False), "batch": timed([5.0] * 5, batch_size=4),
                   "compile+eagle": timed([10.0, 12.5, 20.0, 8.0, 10.0]),
                   "compile+eagle-tree": timed([16.0] * 5, drafted=12)}
    doc["runs"]["compile+eagle"]["summary"]["speculation"] = {"mean_accepted_tokens": 2.7, "target_forwards": 40}
    doc["runs"]["compile+eagle"]["summary"].update(draft_ms=8.0, verify_ms=40.0, samples=5)
    doc["comparisons"] = [comparison("compile", 5.0, samples=5), comparison("int4wo+compile", 10.0, samples=5),
                          comparison("batch", 20.0, samples=5), comparison("compile+eagle", 10.0, samples=5),
                          comparison("compile+eagle-tree", 6.25, samples=5)]
    return doc


def test_speculation_is_measured_against_the_fastest_lossless_unbatched_autoregressive_run():
    doc = ar_doc()
    assert report.fastest_autoregressive(doc) == "compile"  # int4wo+compile is lossy, batch is batched
    over = report.over_fastest_autoregressive(doc)
    assert list(over) == ["compile+eagle", "compile+eagle-tree"]  # the tree is told speculative by its samples
    assert over["compile+eagle"].median == pytest.approx(2.0)  # ratios 2, 1.6, 1, 2.5, 2
    assert over["compile+eagle"].q1 == pytest.approx(1.6) and over["compile+eagle"].q3 == pytest.approx(2.0)
    assert over["compile+eagle-tree"].median == pytest.approx(1.25) and over["compile+eagle-tree"].samples == 5


def test_a_real_divergence_takes_a_run_out_of_the_autoregressive_candidates():
    doc = ar_doc()
    doc["comparisons"][0] = comparison("compile", 5.0, samples=5, exact=0.8, real=1)
    assert report.fastest_autoregressive(doc) == "baseline"
    assert report.over_fastest_autoregressive(doc)["compile+eagle-tree"].median == pytest.approx(100 / 16)


def test_markdown_shows_speculation_against_the_fastest_autoregressive_run_and_its_cost_per_step():
    markdown = report.render_markdown(ar_doc())
    table = markdown[markdown.index("## Speculation over the fastest autoregressive"):]
    assert "| candidate | vs fastest AR (compile) median [IQR] | vs baseline |" in table
    # 8 ms drafting and 40 ms verifying per sample over 40 forwards of 5 samples: 1.00 and 5.00 ms per step
    assert "| compile+eagle | **2.00×** [1.60–2.00] | 10.00× | 2.70 | 1.00 | 5.00 |" in table
    assert "over the fastest autoregressive strategy (compile): **compile+eagle** 2.00×" in markdown
    assert "## Speculation over" not in report.render_markdown(document())  # no speculative run, no section


def test_summary_warns_loudly_about_real_divergences_only():
    from egpt_speed.summary_table import real_divergence_warning

    def document(counts):
        return {"comparisons": [{"reference": "baseline", "candidate": name, "real_divergence_count": n}
                                for name, n in counts.items()]}

    line = real_divergence_warning(document({"int8": 3, "speculative": 0}))
    assert line.startswith("WARNING") and "int8 (3)" in line and "speculative" not in line
    assert real_divergence_warning(document({"speculative": 0, "compile": None})) is None
