"""Finished features reached through the CLI: --preprocess, input warnings, --allow-paths-outside-data,
--allow-tokenizer-mismatch, shared defaults, and LLaVA / Video-LLaVA checkpoints as --model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from egpt_speed.cli import app
from helpers import write_eventgpt_checkpoint

FAST = ("-n", "2", "--warmup", "0", "--max-new-tokens", "4", "--device", "cpu")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def only_result(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def refused(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr


@pytest.fixture
def no_load(monkeypatch):
    def load(*args, **kwargs):
        pytest.fail("a refused run must not load a model")

    monkeypatch.setattr("egpt_speed.baselines.runner.load_model", load)


# ------------------------------------------------------------------------------------------ issue 13: --preprocess


def test_unknown_preprocess_is_refused_before_loading(tmp_path, no_load):
    refused(invoke("run", "baseline", "--preprocess", "gpu", "--device", "cpu", "--out", str(tmp_path)), "--preprocess")


def test_device_preprocess_gives_the_cpu_tokens_and_records_a_zero_pixel_diff(tmp_path, tiny_dataset, tiny_loader):
    documents = {}
    for mode in ("cpu", "device"):
        out = tmp_path / mode
        result = invoke("run", "baseline", "--preprocess", mode, "--data", str(tiny_dataset), *FAST, "--out", str(out))
        assert result.exit_code == 0, result.output
        documents[mode] = only_result(out)
    device, cpu = documents["device"]["config"], documents["cpu"]["config"]
    assert (device["preprocess"], cpu["preprocess"]) == ("device", "cpu")
    assert device["preprocess_max_pixel_diff"] == 0.0  # bit-exact to the PIL processor
    assert cpu["preprocess_max_pixel_diff"] is None  # measured only when Stage 2 runs on the device
    assert "disk read" in device["stage1_note"]
    tokens = {mode: [s["token_ids"] for s in doc["runs"]["baseline"]["samples"]] for mode, doc in documents.items()}
    assert tokens["device"] == tokens["cpu"]


def test_auto_preprocess_resolves_to_cpu_without_a_gpu(tmp_path, tiny_dataset, tiny_loader):
    result = invoke("run", "baseline", "--data", str(tiny_dataset), *FAST, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    config = only_result(tmp_path)["config"]
    assert (config["preprocess"], config["preprocess_requested"]) == ("cpu", "auto")


def test_a_processor_the_device_path_cannot_reproduce_fails_before_any_sample(tmp_path, tiny_dataset, tiny_loader,
                                                                             monkeypatch):
    from egpt_speed.baselines import runner

    load = runner.load_model

    def unusual(*args, **kwargs):
        model = load(*args, **kwargs)
        model.image_processor.do_center_crop = False
        return model

    monkeypatch.setattr("egpt_speed.baselines.runner.load_model", unusual)
    out = tmp_path / "out"
    refused(invoke("run", "baseline", "--preprocess", "device", "--data", str(tiny_dataset), *FAST, "--out", str(out)),
            "--preprocess cpu")
    assert not out.exists() or not list(out.iterdir())  # no journal: no sample ran


def _unsorted_clips(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, t in (("a", np.arange(300, dtype=np.int64)[::-1].copy()), ("b", np.arange(300, dtype=np.int64))):
        record = {"x": rng.integers(0, 60, 300).astype(np.uint16), "y": rng.integers(0, 40, 300).astype(np.uint16),
                  "t": t, "p": rng.integers(0, 2, 300).astype(np.uint8)}
        root.mkdir(parents=True, exist_ok=True)
        np.save(root / f"{name}.npy", record, allow_pickle=True)
    return root


def test_input_warnings_are_recorded_per_sample_and_for_the_run(tmp_path, tiny_loader):
    data = _unsorted_clips(tmp_path / "clips")
    result = invoke("run", "baseline", "--data", str(data), *FAST, "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    document = only_result(tmp_path / "out")
    by_id = {s["id"]: s["input_warnings"] for s in document["runs"]["baseline"]["samples"]}
    assert by_id["b"] == [] and len(by_id["a"]) >= 1 and "sorted" in by_id["a"][0]
    assert document["config"]["input_warnings"] == sorted(by_id["a"])


def test_paths_outside_the_dataset_need_the_flag(tmp_path, tiny_dataset, tiny_loader):
    data = tmp_path / "ds"
    shutil.copytree(tiny_dataset, data)
    json_path = data / "EventGPT_Instruction_Subset.json"
    entries = json.loads(json_path.read_text())
    outside = tmp_path / "elsewhere.npy"
    shutil.copy(data / "event_npy" / entries[0]["event_data"], outside)
    entries[0]["event_data"] = str(outside)
    json_path.write_text(json.dumps(entries))
    refused(invoke("run", "baseline", "--data", str(data), *FAST, "--out", str(tmp_path / "a")),
            "--allow-paths-outside-data")
    result = invoke("run", "baseline", "--data", str(data), "--allow-paths-outside-data", *FAST,
                    "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert only_result(tmp_path / "b")["config"]["allow_paths_outside_data"] is True


# ------------------------------------------------------------------------------------------ issue 12 item 4


@pytest.fixture(scope="module")
def nfkc_checkpoint(tmp_path_factory):
    return write_eventgpt_checkpoint(tmp_path_factory.mktemp("nfkc") / "ck", normalization="nmt_nfkc")


def test_tokenizer_mismatch_is_refused_then_allowed_and_recorded(tmp_path, tiny_dataset, nfkc_checkpoint):
    args = ("run", "baseline", "--model", str(nfkc_checkpoint), "--data", str(tiny_dataset), *FAST)
    refused(invoke(*args, "--out", str(tmp_path / "a")), "--allow-tokenizer-mismatch")
    result = invoke(*args, "--allow-tokenizer-mismatch", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    document = only_result(tmp_path / "b")
    assert "sentencepiece gives" in document["env"]["tokenizer_mismatch"]
    assert document["config"]["allow_tokenizer_mismatch"] is True


def test_train_draft_clips_follow_the_same_path_rule(tmp_path, tiny_dataset):
    from egpt_speed.errors import EgptError
    from egpt_speed.train_draft import training_clips

    data = tmp_path / "ds"
    shutil.copytree(tiny_dataset, data)
    json_path = data / "EventGPT_Instruction_Subset.json"
    entries = json.loads(json_path.read_text())
    entries[0]["event_data"] = "../../" + entries[0]["event_data"]
    json_path.write_text(json.dumps(entries))
    (tmp_path / entries[0]["event_data"][6:]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "event_npy" / entries[1]["event_data"], tmp_path / entries[0]["event_data"][6:])
    with pytest.raises(EgptError, match="--allow-paths-outside-data"):
        training_clips(str(data), 3, 0, 1000)
    specs, drawn_from = training_clips(str(data), 3, 0, 1000, allow_outside=True)
    assert len(specs) == 3 and drawn_from is None and specs[0].event_path.is_file()


# ------------------------------------------------------------------------------------------ defaults in one place


def test_library_defaults_are_the_cli_defaults():
    import torch

    from egpt_speed.decoding import GenerationSettings
    from egpt_speed.options import MeasureOptions, StrategyOptions, default_strategy_options
    from egpt_speed.strategies import registry
    from egpt_speed.strategies.registry import RunContext

    assert GenerationSettings().temperature == MeasureOptions().temperature == 0.6
    ctx = RunContext(device=torch.device("cpu"), dtype=torch.float32)
    assert ctx.options == default_strategy_options()
    assert (ctx.gamma, ctx.batch_size, ctx.model_spec) == (MeasureOptions().gamma, MeasureOptions().batch_size,
                                                           MeasureOptions().model)
    bare = RunContext(device=torch.device("cpu"), dtype=torch.float32, options={})  # a caller passing no options
    assert registry.build("pld", bare).settings()["max_ngram"] == StrategyOptions().pld_ngram


# ------------------------------------------------------------------------------------------ issue 17 item 1


@pytest.fixture(scope="module")
def llava_checkpoints(tmp_path_factory):
    from helpers import make_sp_tokenizer
    from test_llava_family import write_llava, write_video_llava

    tokenizer = make_sp_tokenizer(tmp_path_factory.mktemp("llava-tok"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    root = tmp_path_factory.mktemp("llava-ckpt")
    return {"llava": write_llava(root / "llava", tokenizer), "video_llava": write_video_llava(root / "video", tokenizer)}


@pytest.mark.parametrize("family", ["llava", "video_llava"])
def test_llava_families_run_through_compare_exactly(family, llava_checkpoints, tiny_dataset, tmp_path):
    import torch

    from egpt_speed.datasets import discover_samples
    from egpt_speed.llava_family import FRAMES, load_clip_frames, load_llava_checkpoint
    from test_llava_family import transformers_reference

    checkpoint, out = llava_checkpoints[family], tmp_path / "out"
    result = invoke("compare", "baseline", "speculative", "--model", str(checkpoint), "--draft", "target",
                    "--data", str(tiny_dataset), "-n", "2", "--warmup", "1", "--max-new-tokens", "6", "--device", "cpu",
                    "--dtype", "float32", "--out", str(out))
    assert result.exit_code == 0, result.output
    document = only_result(out)
    config = document["config"]
    assert (config["model_family"], config["frames_used"], config["preprocess"]) == (family, FRAMES[family], "cpu")
    (comparison,) = document["comparisons"]
    assert comparison["exact_match_rate"] == 1.0
    samples = document["runs"]["baseline"]["samples"]
    first = discover_samples(tiny_dataset)[0]
    assert samples[0]["id"] == first.id
    model = load_llava_checkpoint(checkpoint, torch.float32, torch.device("cpu"))
    expected, expanded = transformers_reference(family, checkpoint, model, load_clip_frames(first, family), first.query)
    assert samples[0]["token_ids"] == expected[:6] and samples[0]["prompt_tokens"] == expanded


@pytest.mark.parametrize("flags, needle", [(("--source", "png"), "--source png"),
                                           (("--preprocess", "device"), "--preprocess device"),
                                           (("--vision-tower", "/nonexistent"), "--vision-tower")])
def test_llava_families_refuse_event_only_options_before_loading(flags, needle, llava_checkpoints, tmp_path, no_load):
    refused(invoke("run", "baseline", "--model", str(llava_checkpoints["video_llava"]), *flags, "--device", "cpu",
                   "--out", str(tmp_path)), needle)


def test_synthetic_video_frames_only_when_a_llava_family_needs_them(tmp_path):
    from egpt_speed.datasets import resolve_samples

    plain = resolve_samples("synthetic", 1, 0, 0, 2000, tmp_path)
    video = resolve_samples("synthetic", 1, 0, 0, 2000, tmp_path, video=True)
    assert plain[0].video_dir is None
    assert len(list(video[0].video_dir.glob("*.png"))) >= 8
    assert np.load(plain[0].event_path, allow_pickle=True).item()["x"].tolist() == \
        np.load(video[0].event_path, allow_pickle=True).item()["x"].tolist()  # the same clip, with frames
