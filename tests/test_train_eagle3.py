"""train-draft --head-style eagle3: an EAGLE-3 head trained online from the target's fused low/mid/high layers
with the training-time test (--unroll) learns, drafts losslessly, and is written in the vLLM / SGLang layout."""

from __future__ import annotations

import json

import pytest
import torch

from egpt_speed import eagle_formats as ef
from egpt_speed import train_draft as td
from egpt_speed.datasets import discover_samples, load_questions
from egpt_speed.decoding import GenerationSettings
from egpt_speed.errors import EgptError
from egpt_speed.proposers import EagleProposer
from egpt_speed.speculation import DynamicTarget, speculative_decode
from egpt_speed.stages import stage1_load, stage2_preprocess, stage3_vision
from egpt_speed.timing import Clock
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(sp_tokenizer, tiny_dataset):
    model = make_tiny_eventgpt(0, layers=6, tokenizer=sp_tokenizer)
    specs = discover_samples(tiny_dataset)
    train_pairs, heldout_pairs = td.pairs_for(specs, load_questions(), 16, 0.2, 0)
    items = td.collect_answers(model, train_pairs + heldout_pairs, GenerationSettings(max_new_tokens=20), 5, batch_size=8)
    aux = td.eagle3_aux_layers(6)
    train = td.OnlineSet(model, items[:len(train_pairs)], 2, aux)
    heldout = td.OnlineSet(model, items[len(train_pairs):], 2, aux)
    vocab = td.eagle3_vocabulary(train, 0, [2], model.llm.config.vocab_size)
    head, _, train_top1, heldout_top1 = td.train_head(model, train, heldout, 8, 1e-3, 0, unroll=2, batch_size=2,
                                                      draft_vocab=vocab)
    return model, specs, head, train, train_top1, vocab


def test_an_eagle3_head_learns(trained):
    model, _, head, train, train_top1, vocab = trained
    assert head.aux_layers == [2, 3, 3] and torch.equal(head.draft_vocab, vocab)
    untrained = td.initial_eagle3_head(model, [2, 3, 3], vocab)
    assert train_top1 > td.top1(untrained, model.llm.lm_head, train, CPU) + 0.1


def test_online_eagle3_batches_carry_the_fused_layers(trained):
    model, _, _, train, _, _ = trained
    batch = train.batch([0, 1], CPU)
    plain = td.online_batch(model, [train.items[0], train.items[1]], 2)
    assert batch.features.shape[-1] == 3 * plain.features.shape[-1]
    assert torch.equal(batch.labels, plain.labels)


def test_a_trained_eagle3_head_drafts_losslessly_after_export(trained, tmp_path):
    model, specs, head, _, _, _ = trained
    report = td.TrainReport(1, 1, 1, 0.0, 0.0, 0.0, 0.0, 0.0, td.ClipRecord("x", None, [], []), head_style="eagle3")
    td.save_head(head, tmp_path / "h", report, "test")
    assert json.loads((tmp_path / "h" / "train_report.json").read_text())["report"]["head_style"] == "eagle3"
    loaded = ef.load_public_head(tmp_path / "h", model.hidden_size, model.llm.config.vocab_size, CPU, torch.float32)
    encoded = stage3_vision(stage2_preprocess(stage1_load(specs[0], "npy", 5), model, 5), model)
    embeds = model.splice(encoded.prompt_ids, encoded.event_features)
    with torch.inference_mode():
        reference = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                       max_new_tokens=30, do_sample=False, eos_token_id=None)[0].tolist()
    proposer = EagleProposer(loaded, model.llm, embeds)
    clock = Clock(CPU)
    clock.begin()
    result = speculative_decode(DynamicTarget(model.llm, proposer.aux_layers), embeds, proposer,
                                GenerationSettings(max_new_tokens=30), 4, set(), clock)
    assert result.token_ids == reference
    assert result.metrics["accepted"] > 0


def test_eagle3_needs_three_layers_and_online_training():
    with pytest.raises(Exception, match="fuses three target layers"):
        td.eagle3_aux_layers(2)


def test_a_head_starts_from_the_targets_last_layer(trained):
    model = trained[0]
    last = model.llm.model.layers[-1]
    assert td.layer_weights(last).keys() == dict(last.named_parameters()).keys()
    head = td.initial_eagle_head(model, True)
    torch.testing.assert_close(head.layer.mlp.down_proj.weight, last.mlp.down_proj.weight)
    vocab = torch.arange(10)
    head3 = td.initial_eagle3_head(model, [2, 3, 3], vocab)
    torch.testing.assert_close(head3.layer.self_attn.q_proj.weight[:, model.hidden_size:], last.self_attn.q_proj.weight)
    torch.testing.assert_close(head3.lm_head.weight, model.llm.lm_head.weight[:10])


def test_train_draft_head_style_eagle3_through_the_cli(tmp_path, monkeypatch, sp_tokenizer):
    from typer.testing import CliRunner

    from egpt_speed.cli import app

    monkeypatch.setattr(td, "load_model", lambda spec, dtype, device, **kw: make_tiny_eventgpt(0, layers=6, tokenizer=sp_tokenizer).to(dtype=dtype))
    out = tmp_path / "head"
    result = CliRunner().invoke(app, ["train-draft", "--data", "synthetic", "--synthetic-events", "2000", "-n", "8",
                                      "--clips", "3", "--device", "cpu", "--out", str(out), "--batch-size", "4",
                                      "--train-batch", "4", "--epochs", "1", "--max-new-tokens", "6", "--unroll", "2",
                                      "--head-style", "eagle3", "--draft-vocab", "16"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["collect.journal.jsonl", "config.json", "model.safetensors", "train_report.json"]
    assert ef.detect_format(out) == ef.EAGLE3
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3] and config["draft_vocab_size"] <= 17
    assert json.loads((out / "train_report.json").read_text())["report"]["head_style"] == "eagle3"


def train_small(out, monkeypatch, sp_tokenizer, layers: int, *extra: str):
    from typer.testing import CliRunner

    from egpt_speed.cli import app

    monkeypatch.setattr(td, "load_model", lambda spec, dtype, device, **kw: make_tiny_eventgpt(0, layers=layers, tokenizer=sp_tokenizer).to(dtype=dtype))
    result = CliRunner().invoke(app, ["train-draft", "--data", "synthetic", "--synthetic-events", "2000", "-n", "8",
                                      "--clips", "3", "--device", "cpu", "--out", str(out), "--batch-size", "4",
                                      "--train-batch", "4", "--epochs", "1", "--max-new-tokens", "6", "--draft-vocab", "16",
                                      *extra])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("layers,extra,style,unroll", [
    (6, [], "eagle3", 3),  # the default: EAGLE-3 with its training-time test
    (6, ["--store-features"], "eagle", 1),  # the stored-features path trains the EAGLE-1/2 head
    (6, ["--unroll", "2"], "eagle3", 2),
    (6, ["--eagle1-layout"], "eagle", 1),
    (6, ["--head-style", "eagle"], "eagle", 1),
    (2, [], "eagle", 1),  # too few layers to fuse three
])
def test_train_draft_picks_its_head_style_and_unroll(tmp_path, monkeypatch, sp_tokenizer, layers, extra, style, unroll):
    out = tmp_path / "head"
    train_small(out, monkeypatch, sp_tokenizer, layers, *extra)
    report_file = out / ("train_report.json" if style == "eagle3" else "eagle_config.json")
    report = json.loads(report_file.read_text())["report"]
    assert (report["head_style"], report["unroll"]) == (style, unroll)
    assert ef.detect_format(out) == (ef.EAGLE3 if style == "eagle3" else None)


def test_resume_keeps_the_interrupted_runs_head_style(tmp_path):
    """A run interrupted before the eagle3 default (its checkpoint: eagle, unroll 1) resumes as what it was."""
    from egpt_speed.options import TrainDraftOptions

    torch.save({"settings": {"head_style": "eagle", "unroll": 1}}, tmp_path / "train_checkpoint.pt")
    config = TrainDraftOptions(out=tmp_path, resume=True)
    resolved = td.resolve_head_style(config, 30)
    assert (resolved.head_style, resolved.unroll) == ("eagle", 1)
    fresh = td.resolve_head_style(TrainDraftOptions(out=tmp_path), 30)
    assert (fresh.head_style, fresh.unroll) == ("eagle3", 3)
    with pytest.raises(EgptError, match="three target layers"):  # refused before any answer is collected
        td.resolve_head_style(TrainDraftOptions(out=tmp_path, head_style="eagle3"), 2)


def test_a_retrained_head_replaces_the_other_layout_in_its_directory(tmp_path, monkeypatch, sp_tokenizer):
    """An eagle head trained into a directory holding an eagle3 head: the public layout, which loads first, goes."""
    from egpt_speed.drafts import load_draft

    out = tmp_path / "head"
    train_small(out, monkeypatch, sp_tokenizer, 6)
    assert ef.detect_format(out) == ef.EAGLE3
    train_small(out, monkeypatch, sp_tokenizer, 6, "--head-style", "eagle")
    assert ef.detect_format(out) is None and not (out / "model.safetensors").exists()
    model = make_tiny_eventgpt(0, layers=6, tokenizer=sp_tokenizer)
    draft = load_draft(str(out), model, "tiny-test", torch.device("cpu"), torch.float32)
    assert not isinstance(draft.head, ef.Eagle3Head)
