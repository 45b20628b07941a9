"""The compare plot's headline (issue 13 item 4): Stage-4 and end-to-end speedups and the share of Stages 1–3."""

from __future__ import annotations

import pytest

from egpt_speed.report import write_plots
from egpt_speed.report_headline import headline_rows


def document() -> dict:
    def run(stage4: float) -> dict:
        stages = {"stage1_ms": 2.0, "stage2_ms": 3.0, "stage3_ms": 5.0, "stage4_ms": stage4}
        total = sum(stages.values())
        pct = {k.replace("_ms", "_pct"): 100.0 * v / total for k, v in stages.items()}
        return {"summary": {**stages, **pct, "total_ms": total}, "lossless": True}
    return {"env": {"device": "cpu"}, "config": {"model": "tiny", "reference": "baseline", "samples": 2},
            "runs": {"baseline": run(90.0), "compile": run(10.0)},
            "comparisons": [{"reference": "baseline", "candidate": "compile", "speedup_stage4_median": 9.0,
                             "speedup_total_median": 5.0, "exact_match_rate": 1.0}]}


def test_rows_hold_both_speedups_and_the_share_of_stages_1_to_3():
    reference, candidate = headline_rows(document())
    assert (reference.name, reference.speedup_stage4, reference.speedup_total) == ("baseline", 1.0, 1.0)
    assert reference.stages_1_3_share == pytest.approx(0.10)
    assert (candidate.name, candidate.speedup_stage4, candidate.speedup_total) == ("compile", 9.0, 5.0)
    assert candidate.stages_1_3_share == pytest.approx(0.50)


def test_a_run_without_stage_shares_has_no_share():
    doc = document()
    del doc["runs"]["compile"]["summary"]["stage2_pct"]
    assert headline_rows(doc)[1].stages_1_3_share is None


def test_the_compare_png_is_written_with_the_headline(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_plots(document(), tmp_path / "c.png").stat().st_size > 0
