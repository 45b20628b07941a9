"""--source png reproduces the npy path; --frames 1 changes the event-token count; --resume reuses a result."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from egpt_speed.cli import app


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def only_result(out: Path) -> dict:
    [path] = out.glob("*.json")
    return json.loads(path.read_text())


def test_png_source_gives_the_same_tokens_as_rendering_the_npy(tmp_path, tiny_loader, tiny_dataset):
    documents = {}
    for source in ("npy", "png"):
        out = tmp_path / source
        result = run("run", "baseline", "--data", str(tiny_dataset), "-n", "2", "--warmup", "0", "--max-new-tokens", "6",
                     "--device", "cpu", "--source", source, "--out", str(out))
        assert result.exit_code == 0, result.output
        documents[source] = only_result(out)
    assert documents["png"]["config"]["source"] == "png"
    npy_samples = documents["npy"]["runs"]["baseline"]["samples"]
    png_samples = documents["png"]["runs"]["baseline"]["samples"]
    # the pre-rendered PNGs are the renderer's output, so the whole pipeline sees the same pixels
    assert [s["token_ids"] for s in npy_samples] == [s["token_ids"] for s in png_samples]


def test_one_frame_mode_has_one_temporal_token(tmp_path, tiny_loader, tiny_dataset):
    tokens = {}
    for frames in ("5", "1"):
        out = tmp_path / frames
        result = run("run", "baseline", "--data", str(tiny_dataset), "-n", "1", "--warmup", "0", "--max-new-tokens", "4",
                     "--device", "cpu", "--frames", frames, "--out", str(out))
        assert result.exit_code == 0, result.output
        tokens[frames] = only_result(out)["config"]["event_tokens"]
    assert tokens["5"] - tokens["1"] == 4  # T temporal tokens + P spatial tokens: 5 + P vs 1 + P


def test_resume_reuses_a_finished_identical_run(tmp_path, tiny_loader, tiny_dataset):
    args = ["run", "baseline", "--data", str(tiny_dataset), "-n", "1", "--warmup", "0", "--max-new-tokens", "4",
            "--device", "cpu", "--out", str(tmp_path)]
    assert run(*args).exit_code == 0
    loads = len(tiny_loader)
    again = run(*args, "--resume")
    assert again.exit_code == 0 and "nothing re-run" in again.output
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(tiny_loader) == loads
    changed = run(*args[:-2], "--max-new-tokens", "5", "--out", str(tmp_path), "--resume")
    assert changed.exit_code == 0 and len(list(tmp_path.glob("*.json"))) == 2
