"""The CLI contract: bad input is one `error:` line on stderr and no result file; a real checkpoint runs end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from egpt_speed.cli import app
from egpt_speed.results import SCHEMA, TIMED_KEYS
from helpers import write_eventgpt_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = ("stage1_ms", "stage2_ms", "stage3_ms", "stage4_ms", "prefill_ms", "decode_ms", "total_ms",
                "per_token_ms", "tokens_per_s", "num_tokens")
SAMPLE_KEYS = SUMMARY_KEYS[:-2] + ("num_tokens", "id", "token_ids", "text")
COMPARISON_KEYS = ("reference", "candidate", "speedup_stage4_median", "speedup_total_median", "exact_match_rate",
                   "token_match_rate", "first_divergence_mean")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_error_line(result, out: Path, needle: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() or not list(out.glob("*.json")), "a failed run must not write a result"


# ------------------------------------------------------------------------------------------ bad data


def _npy(path: Path, record) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, record, allow_pickle=True)
    return path


def _clip(n: int = 50, drop: str | None = None) -> dict:
    rng = np.random.default_rng(0)
    record = {"x": rng.integers(0, 60, n).astype(np.uint16), "y": rng.integers(0, 40, n).astype(np.uint16),
              "t": np.arange(n, dtype=np.int64), "p": rng.integers(0, 2, n).astype(np.uint8)}
    record.pop(drop, None)
    return record


def _instruction_json(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "EventGPT_Instruction_Subset.json").write_text(text)
    return root


BAD_DATA = {
    # name: (make the --data path under tmp, what the error line says)
    "missing-dir": (lambda tmp: tmp / "no-such-dataset", "does not exist"),
    "empty-dir": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "neither"),
    "broken-json": (lambda tmp: _instruction_json(tmp / "ds", "[{\"id\": \"0\","), "does not parse as JSON"),
    "json-to-missing-npy": (lambda tmp: _instruction_json(tmp / "ds", json.dumps(
        [{"id": "000000", "event_data": "seq/000000.npy", "conversations": []}])), "does not exist"),
    "corrupt-npy": (lambda tmp: ((tmp / "clips").mkdir(), (tmp / "clips" / "a.npy").write_bytes(b"\x93NUMPY garbage"),
                                 tmp / "clips")[-1], ".npy"),
    "zero-events": (lambda tmp: _npy(tmp / "clips" / "a.npy", _clip(0)).parent, "zero events"),
    "clip-without-t": (lambda tmp: _npy(tmp / "clips" / "a.npy", _clip(drop="t")).parent, "lacks the key(s) t"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_error_line_and_no_result(case, tmp_path, tiny_loader):
    make, needle = BAD_DATA[case]
    data = make(tmp_path)
    out = tmp_path / "results"
    result = invoke("run", "baseline", "--data", str(data), "-n", "1", "--warmup", "0", "--max-new-tokens", "2",
                    "--device", "cpu", "--out", str(out))
    assert_one_error_line(result, out, needle)


# ------------------------------------------------------------------------------------------ bad options


BAD_OPTIONS = {
    "unknown-strategy": (["run", "warp-drive"], "unknown strategy 'warp-drive'"),
    "unknown-candidate": (["compare", "baseline", "warp-drive"], "unknown strategy 'warp-drive'"),
    "frames-3": (["run", "baseline", "--frames", "3"], "--frames 3"),
    "dtype-float8": (["run", "baseline", "--dtype", "float8"], "--dtype 'float8'"),
    "missing-model": (["run", "baseline", "--model", "/nonexistent/EventGPT-7b"], "does not exist"),
    "zero-samples": (["run", "baseline", "-n", "0"], "--samples"),
    "compile-mode": (["run", "compile", "--compile-mode", "turbo"], "--compile-mode 'turbo' is not one of"),
    "draft-compile": (["run", "compile+eagle", "--draft-compile", "reduce-overhead"], "--draft-compile 'reduce-overhead'"),
    "fused-step-alone": (["compare", "baseline", "compile", "--fused-step"], "--fused-step fuses the step of compile+eagle"),
    "fused-step-cudagraph-trees": (["run", "compile+eagle", "--fused-step", "--compile-mode", "reduce-overhead"],
                                   "--fused-step captures its step itself"),
    "fused-step-adaptive": (["run", "compile+eagle", "--fused-step", "--adaptive-gamma"], "fixed γ"),
    "fused-step-sampled": (["run", "compile+eagle", "--fused-step", "--sample"], "--fused-step fuses the greedy step"),
    "draft-compile-alone": (["run", "speculative", "--draft-compile", "default"], "--draft-compile compiles the drafter"),
    "fused-step-draft-compile": (["run", "compile+eagle", "--fused-step", "--draft-compile", "default"],
                                 "drop --draft-compile or --fused-step"),
    "fused-step-no-compiled-drafter": (["run", "eagle+sdpa", "--fused-step"], "--fused-step fuses the step"),
    "coordinate-descent-without-compile": (["compare", "baseline", "speculative", "--coordinate-descent"],
                                           "--coordinate-descent sets how compile's decode step is compiled"),
    "no-coordinate-descent-without-compile": (["run", "int8", "--no-coordinate-descent"], "add a compile strategy"),
    "coordinate-descent-uncompiled": (["run", "compile", "--coordinate-descent", "--compile-mode", "none"],
                                      "which compile does not use here"),
    "no-coordinate-descent-cpu-default": (["run", "compile", "--no-coordinate-descent"], "add --compile-mode default"),
    "flex-eager-tree": (["run", "flex+eagle-tree"], "use flex+compile+eagle-tree"),
    "flex-batched": (["run", "flex+compile", "--batch-size", "2"], "runs batch 1"),
    "draft-missing": (["run", "speculative", "--draft", "/nonexistent/draft"], "--draft '/nonexistent/draft' is neither a preset"),
    "draft-unknown-preset": (["run", "speculative", "--draft", "foo"], "tiny-eagle"),
    "tree-topk-zero": (["run", "eagle-tree", "--tree-topk", "0"], "--tree-topk must be at least 1"),
    "tree-nodes-zero": (["run", "eagle-tree", "--tree-nodes", "0"], "--tree-nodes must be at least 1"),
    "pld-ngram-zero": (["compare", "baseline", "pld", "--pld-ngram", "0"], "--pld-ngram must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_one_error_line_and_no_result(case, tmp_path, tiny_loader):
    args, needle = BAD_OPTIONS[case]
    out = tmp_path / "results"
    result = invoke(*args, "--device", "cpu", "--out", str(out)) if "--device" not in args else invoke(*args)
    assert_one_error_line(result, out, needle)
    assert not tiny_loader, "bad options must be refused before any model is loaded"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused(tmp_path, tiny_loader):
    out = tmp_path / "results"
    assert_one_error_line(invoke("run", "baseline", "--device", "cuda", "--out", str(out)), out, "no CUDA GPU")


def _subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "egpt_speed.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.json"
    plain = invoke("report", str(missing))
    assert plain.exit_code != 0 and "Traceback" not in plain.output
    debug = _subprocess("--debug", "report", str(missing), cwd=tmp_path)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "EgptError" in debug.stderr
    assert "does not exist" in debug.stderr


def test_corrupt_clip_with_a_real_checkpoint_in_a_real_process(tmp_path, tiny_dataset):
    """After weights and processor load, a bad clip still gives exactly one stderr line (no library chatter)."""
    checkpoint = write_eventgpt_checkpoint(tmp_path / "ck", tower_in_checkpoint=False)
    clips = tmp_path / "clips"
    _npy(clips / "a.npy", _clip(0))
    out = tmp_path / "results"
    result = _subprocess("run", "baseline", "--model", str(checkpoint), "--data", str(clips), "-n", "1", "--warmup", "0",
                         "--device", "cpu", "--out", str(out), cwd=tmp_path)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: Event file") and "zero events" in result.stderr
    assert not out.exists() or not list(out.glob("*.json"))


# ------------------------------------------------------------------------------------------ strategies, report


def test_strategies_lists_baseline_as_runnable():
    result = invoke("strategies", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if re.search(r"\bbaseline\b", line)]
    assert rows and "yes" in rows[0]


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory, tiny_dataset):
    """`egpt-speed run baseline` on a real-format checkpoint (weights sharded, tower inside), nothing patched."""
    root = tmp_path_factory.mktemp("e2e")
    checkpoint = write_eventgpt_checkpoint(root / "EventGPT-tiny", seed=4, sharded=True)
    out = root / "results"
    result = invoke("run", "baseline", "--model", str(checkpoint), "--data", str(tiny_dataset), "-n", "2", "--warmup", "1",
                    "--max-new-tokens", "8", "--out", str(out))
    return result, out, checkpoint


def test_run_with_a_checkpoint_writes_the_documented_result(checkpoint_run, tiny_dataset):
    result, out, checkpoint = checkpoint_run
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*.json")
    assert re.fullmatch(r"baseline_\d{8}_\d{6}\.json", path.name)
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()
    assert path.name in result.stdout
    document = json.loads(path.read_text())
    assert document["schema"] == SCHEMA == "egpt-speed/1"
    for key in ("device", "torch", "transformers", "git_commit", "command"):
        assert key in document["env"]
    config = document["config"]
    assert config["model"] == str(checkpoint) and config["data"] == str(tiny_dataset)
    assert (config["samples"], config["warmup"], config["max_new_tokens"], config["frames"]) == (2, 1, 8, 5)
    assert config["event_tokens"] == 10 and config["source"] == "npy" and "attn_implementation" in config
    assert config["random_weights"] is False
    run = document["runs"]["baseline"]
    assert set(SUMMARY_KEYS) <= set(run["summary"]) and set(SUMMARY_KEYS) <= set(TIMED_KEYS)
    assert run["summary"]["samples"] == 2 and len(run["samples"]) == 2
    for sample in run["samples"]:
        assert set(SAMPLE_KEYS) <= set(sample)
        assert 1 <= sample["num_tokens"] == len(sample["token_ids"]) <= 8
        assert isinstance(sample["text"], str)
        assert all(0 <= t < 400 for t in sample["token_ids"])
    assert document["comparisons"] == []
    markdown = path.with_suffix(".md").read_text()
    assert "ms/token" in markdown and "baseline" in markdown


def test_compare_through_the_cli_fills_comparisons(tmp_path, tiny_dataset, tiny_loader):
    out = tmp_path / "results"
    result = invoke("compare", "baseline", "pld", "--data", str(tiny_dataset), "-n", "2", "--warmup", "0",
                    "--max-new-tokens", "6", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    (path,) = out.glob("compare_baseline_vs_pld_*.json")
    document = json.loads(path.read_text())
    assert list(document["runs"]) == ["baseline", "pld"]
    (comparison,) = document["comparisons"]
    assert set(COMPARISON_KEYS) <= set(comparison)
    assert comparison["exact_match_rate"] == 1.0  # pld is lossless in float32


def test_report_rerenders_a_result(checkpoint_run):
    _, out, _ = checkpoint_run
    (path,) = out.glob("*.json")
    path.with_suffix(".md").unlink()
    path.with_suffix(".png").unlink()
    result = invoke("report", str(path))
    assert result.exit_code == 0, result.output
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()
    assert "## baseline" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("content, needle", [
    (json.dumps({"runs": {}}), "is not an egpt-speed result"),
    (json.dumps([1, 2, 3]), "is not an egpt-speed result"),
    ("{broken", "is not valid JSON"),
    (None, "does not exist"),
])
def test_report_refuses_what_is_not_a_result(content, needle, tmp_path):
    path = tmp_path / "thing.json"
    if content is not None:
        path.write_text(content)
    result = invoke("report", str(path))
    assert_one_error_line(result, tmp_path / "nothing-written", needle)
    assert not path.with_suffix(".md").exists()


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"\xff": 1}', b'{"schema": "egpt-speed/1"}'])
def test_report_on_a_damaged_result_is_one_error_line(content, tmp_path):
    path = tmp_path / "result.json"
    path.write_bytes(content)
    result = invoke("report", str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), result.stderr


def test_an_out_name_too_long_is_one_error_line_before_loading(tmp_path, tiny_loader):
    out = tmp_path / ("x" * 300)
    result = invoke("run", "baseline", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 2 and "cannot be used" in result.stderr and "Traceback" not in result.output
    assert not tiny_loader
