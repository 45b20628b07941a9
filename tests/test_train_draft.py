"""train-draft at scale: batched collection matches batch 1, batched training matches per-sequence, no leakage."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from typer.testing import CliRunner

from egpt_speed.hf_generate import generate_baseline
from egpt_speed.baselines.runner import RunConfig, resolve_samples
from egpt_speed import train_draft as td
from egpt_speed.cli import app
from egpt_speed.datasets import discover_samples, load_questions
from egpt_speed.decoding import GenerationSettings
from egpt_speed.eagle import EagleHead, head_config_from_target
from egpt_speed.events import load_event_npy
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")
SETTINGS = GenerationSettings(max_new_tokens=16)


@pytest.fixture(scope="module")
def collected(sp_tokenizer, tiny_dataset):
    """(model, pairs, per-sample reference sequences, batched ones) of a tiny target whose EOS ends answers early."""
    model = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    train, heldout = td.pairs_for(discover_samples(tiny_dataset), load_questions(), 10, 0.2, 0)
    pairs = train + heldout
    answers = [td.collect_sequence(model, s, q, SETTINGS, 5, generate_baseline).answer for s, q in pairs]
    # a token the target often says after its first few, made EOS: answers end at varied lengths
    model.llm.generation_config.eos_token_id = Counter(t for a in answers for t in set(a[3:])).most_common(1)[0][0]
    reference = [td.collect_sequence(model, s, q, SETTINGS, 5, generate_baseline) for s, q in pairs]
    batched = td.collect_batch(model, pairs, SETTINGS, 5, batch_size=4)
    return model, pairs, reference, batched


def test_batched_collection_equals_per_sample(collected):
    _, _, reference, batched = collected
    assert len({len(s.answer) for s in reference}) > 1, "EOS should end some answers early"
    assert [s.answer for s in batched] == [s.answer for s in reference]
    for ours, theirs in zip(batched, reference):
        assert ours.prefix_len == theirs.prefix_len
        assert torch.equal(ours.labels, theirs.labels)
        torch.testing.assert_close(ours.features, theirs.features, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.input_embeds, theirs.input_embeds)
        assert ours.features.shape[1] == ours.input_embeds.shape[1] - 1 == ours.labels.numel()
        assert ours.input_embeds.shape[1] == ours.prefix_len + len(ours.answer)


def test_bfloat16_storage_keeps_the_tokens_in_half_the_memory(collected):
    model, pairs, reference, _ = collected
    stored = td.collect_batch(model, pairs[:3], SETTINGS, 5, batch_size=3, store_dtype=torch.bfloat16)
    for ours, theirs in zip(stored, reference):
        assert ours.features.dtype == ours.input_embeds.dtype == torch.bfloat16
        assert ours.answer == theirs.answer and torch.equal(ours.labels, theirs.labels)
        assert ours.features.untyped_storage().nbytes() * 2 == theirs.features.untyped_storage().nbytes()


def drafted_features(head, features: torch.Tensor, inputs: torch.Tensor, column: int, unroll: int) -> list[torch.Tensor]:
    """What chain drafting computes after the target's features up to `column`: the head reads them into
    a fresh cache, then feeds itself its own predictions → [1, 1, H] per draft step (≤ unroll)."""
    T = features.shape[1]
    cache = DynamicCache(config=head.config)
    predicted = head(features[:, :column + 1], inputs[:, 1:column + 2], torch.arange(column + 1), cache)[:, -1:]
    drafts = [predicted]
    for step in range(2, min(unroll, T - 1 - column) + 1):
        predicted = head(predicted, inputs[:, column + step:column + step + 1], torch.tensor([column + step - 1]), cache)
        drafts.append(predicted)
    return drafts


def reference_loss(head, lm_head, sequence: td.TrainingSequence, unroll: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpadded sequence, written out as inference drafts it (one chain per column): the loss every
    batch must reproduce, so training sees at step s exactly what drafting sees at draft position s."""
    features, inputs = sequence.features.float(), sequence.input_embeds.float()
    T = features.shape[1]
    start = max(sequence.prefix_len - 2, 0)
    chains = [drafted_features(head, features, inputs, column, unroll) for column in range(T - 1)]
    total, first_hits = torch.zeros(()), None
    for step in range(1, unroll + 1):
        length = T - step
        if length <= start:
            break
        prediction = torch.cat([chains[column][step - 1] for column in range(start, length)], dim=1)
        logits = lm_head(prediction)[0]
        labels = sequence.labels[start + step:]
        total = total + (F.smooth_l1_loss(prediction, features[:, start + step:]) + 0.1 * F.cross_entropy(logits, labels)) / step
        first_hits = logits.argmax(-1) == labels if first_hits is None else first_hits
    return total, first_hits


@pytest.fixture(scope="module")
def random_head(collected):
    model = collected[0]
    torch.manual_seed(3)
    return EagleHead(head_config_from_target(model.llm.config)).eval()


@pytest.mark.parametrize("unroll", [1, 3])
def test_a_padded_batch_loss_is_the_mean_of_per_sequence_losses(collected, random_head, unroll):
    model, _, _, sequences = collected
    assert len({s.features.shape[1] for s in sequences}) > 1, "the batch must need padding"
    lm_head = model.llm.lm_head
    with torch.no_grad():
        singles = [reference_loss(random_head, lm_head, s, unroll) for s in sequences]
        for sequence, (loss, hits) in zip(sequences, singles):
            one_loss, one_hits = td.head_loss(random_head, lm_head, td.make_batch([sequence], CPU), unroll)
            torch.testing.assert_close(one_loss, loss)
            assert torch.equal(one_hits, hits)
        batch_loss, batch_hits = td.head_loss(random_head, lm_head, td.make_batch(sequences, CPU), unroll)
    torch.testing.assert_close(batch_loss, torch.stack([loss for loss, _ in singles]).mean())
    assert torch.equal(batch_hits, torch.cat([hits for _, hits in singles]))


def test_top1_does_not_depend_on_the_batch_size(collected, random_head):
    model, _, _, sequences = collected
    by_size = {size: td.top1(random_head, model.llm.lm_head, sequences, CPU, size) for size in (1, 3, len(sequences))}
    assert len(set(by_size.values())) == 1, by_size


def test_synthetic_training_clips_are_not_the_benchmark_clips():
    benchmark = resolve_samples(RunConfig(strategies=["baseline"], synthetic_events=2000))  # compare's defaults
    training, seed = td.training_clips("synthetic", 4, 0, 2000)
    assert seed == td.synthetic_seed(0) != RunConfig(strategies=["baseline"]).seed
    seen = [load_event_npy(spec.event_path) for spec in benchmark]
    for spec in training:
        events = load_event_npy(spec.event_path)
        assert not any(np.array_equal(events.x, other.x) and np.array_equal(events.t, other.t) for other in seen)


def test_auto_train_batch_grows_with_the_data():
    assert [td.auto_train_batch(n) for n in (10, 120, 499, 1000, 4000, 100000)] == [1, 1, 1, 4, 16, 16]


def invoke(*args: str):
    return CliRunner().invoke(app, ["train-draft", *args])


@pytest.fixture
def td_loader(tiny_loader, monkeypatch):
    """train-draft loads its target through `td.load_model`: the same tiny model as the runner's `tiny_loader`."""
    import egpt_speed.baselines.runner as runner

    monkeypatch.setattr(td, "load_model", runner.load_model)  # tiny_loader's stand-in
    return tiny_loader


def test_train_draft_through_the_cli(tmp_path, td_loader, monkeypatch):
    tiny_loader = td_loader
    out = tmp_path / "head"
    common = ("--data", "synthetic", "--synthetic-events", "2000", "-n", "24", "--clips", "5", "--device", "cpu",
              "--out", str(out), "--batch-size", "8", "--train-batch", "4", "--epochs", "4", "--store-features")
    result = invoke(*common, "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert "held-out top-1" in result.stdout
    report = json.loads((out / "eagle_config.json").read_text())["report"]
    assert report["train_sequences"] == 24 and report["heldout_sequences"] == 4
    clips = report["clips"]
    assert clips["data"] == "synthetic" and clips["synthetic_seed"] == td.synthetic_seed(0)
    assert clips["train_clips"] and clips["heldout_clips"] and not set(clips["train_clips"]) & set(clips["heldout_clips"])
    assert len(clips["train_clips"]) + len(clips["heldout_clips"]) == 5
    assert report["draft_vocab"] == 8192 and 0 < report["heldout_vocab_coverage"] <= 1

    model = tiny_loader[0]
    train = td.load_collected(out / "collected.pt", json.loads((out / "collect.journal.jsonl").read_text().splitlines()[0])["collection"])[0]
    trained = EagleHead.load(out, CPU, torch.float32)
    answer_ids = set(torch.cat([td.answer_labels(s) for s in train]).tolist())
    assert set(trained.draft_vocab.tolist()) == answer_ids | {2}  # every id the answers use, and EOS
    untrained = EagleHead(head_config_from_target(model.llm.config))
    assert td.top1(trained, model.llm.lm_head, train, CPU) > td.top1(untrained, model.llm.lm_head, train, CPU) + 0.1

    monkeypatch.setattr(td, "collect_batch", lambda *args, **kwargs: pytest.fail("--resume must not collect again"))
    assert invoke(*common, "--max-new-tokens", "12", "--resume").exit_code == 0
    changed = invoke(*common, "--max-new-tokens", "8", "--resume")
    assert changed.exit_code == 2 and changed.stderr.startswith("error: --resume") and "max_new_tokens" in changed.stderr


@pytest.mark.parametrize("args, needle", [(["--store-dtype", "float16"], "--store-dtype 'float16'"),
                                          (["--clips", "1"], "--clips"), (["--train-batch", "-1"], "--train-batch"),
                                          (["--batch-size", "0"], "--batch-size"), (["--draft-vocab", "-1"], "--draft-vocab"),
                                          (["--head-style", "medusa"], "--head-style 'medusa'"),
                                          (["--head-style", "eagle3", "--store-features"], "drop --store-features"),
                                          (["--target-quant", "int3"], "--target-quant 'int3'"),
                                          (["--target-quant", "nf4"], "--target-quant nf4 (bitsandbytes) needs CUDA")])
def test_bad_train_draft_options_are_one_error_line(tmp_path, td_loader, args, needle):
    tiny_loader = td_loader
    result = invoke("--device", "cpu", "--out", str(tmp_path / "head"), *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not tiny_loader, "bad options must be refused before any model is loaded"


def test_interrupted_training_resumes_to_the_head_an_uninterrupted_run_gives(collected, tmp_path):
    model, _, _, sequences = collected
    train, heldout = sequences[:8], sequences[8:]
    straight, *_ = td.train_head(model, train, heldout, 3, 1e-3, 0, batch_size=2)

    class Interrupted(Exception):
        pass

    steps = []

    def stop_in_epoch_three(count: int) -> None:
        steps.append(count)
        if sum(steps) > 2 * len(train):  # epochs 1–2 done and checkpointed, then a crash
            raise Interrupted

    checkpoint = tmp_path / "train_checkpoint.pt"
    with pytest.raises(Interrupted):
        td.train_head(model, train, heldout, 3, 1e-3, 0, stop_in_epoch_three, batch_size=2, checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["epochs_done"] == 2  # plain data: loading runs no code
    advanced = []
    resumed, *_ = td.train_head(model, train, heldout, 3, 1e-3, 0, advanced.append, batch_size=2,
                                checkpoint=checkpoint, resume=True)
    assert advanced[0] == 2 * len(train) and sum(advanced) == 3 * len(train)  # the bar starts at the saved epoch
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=name)
    with pytest.raises(td.EgptError, match="other settings"):
        td.train_head(model, train, heldout, 4, 1e-3, 0, batch_size=2, checkpoint=checkpoint, resume=True)


def test_online_batches_equal_the_stored_sequences(collected):
    """An online batch (features computed now, padded with other rows) is the stored path's batch."""
    model, pairs, _, stored = collected
    items = td.collect_answers(model, pairs, SETTINGS, 5, batch_size=4)
    assert [item.answer for item in items] == [s.answer for s in stored]
    for window in (0, 3):
        online = td.OnlineSet(model, items, window).batch([1, 4, 6], CPU)
        offline = td.make_batch([stored[i] for i in (1, 4, 6)], CPU, window)
        assert torch.equal(online.starts, offline.starts) and torch.equal(online.scored, offline.scored)
        assert torch.equal(online.lengths, offline.lengths)
        torch.testing.assert_close(online.features, offline.features, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(online.inputs, offline.inputs)
        read = torch.arange(online.labels.shape[1]) >= online.starts[:, None]
        read &= torch.arange(online.labels.shape[1]) < online.lengths[:, None]
        assert torch.equal(online.labels[read], offline.labels[read])
    assert bool((td.make_batch(stored[:2], CPU, 3).starts < td.make_batch(stored[:2], CPU, 0).starts).all())


def test_online_training_learns_as_well_as_stored_features_at_equal_data(collected):
    model, pairs, _, stored = collected
    items = td.collect_answers(model, pairs, SETTINGS, 5, batch_size=4)
    split = 8
    runs = {}
    for name, train, heldout in (("stored", td.StoredSet(stored[:split], 2), td.StoredSet(stored[split:], 2)),
                                 ("online", td.OnlineSet(model, items[:split], 2), td.OnlineSet(model, items[split:], 2))):
        runs[name] = td.train_head(model, train, heldout, 6, 1e-3, 0, batch_size=2)
    untrained = EagleHead(head_config_from_target(model.llm.config))
    baseline = td.top1(untrained, model.llm.lm_head, stored[split:], CPU)
    (_, _, stored_train, stored_heldout), (_, _, online_train, online_heldout) = runs["stored"], runs["online"]
    assert online_train > td.top1(untrained, model.llm.lm_head, stored[:split], CPU) + 0.1
    assert abs(online_train - stored_train) < 0.05 and abs(online_heldout - stored_heldout) < 0.05, runs
    assert online_heldout >= baseline


def test_online_train_draft_writes_no_features_and_resumes_from_the_answers(tmp_path, td_loader, monkeypatch):
    out = tmp_path / "head"
    common = ("--data", "synthetic", "--synthetic-events", "2000", "-n", "12", "--clips", "4", "--device", "cpu",
              "--out", str(out), "--batch-size", "8", "--train-batch", "4", "--epochs", "2", "--max-new-tokens", "8",
              "--eagle1-layout")
    result = invoke(*common)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["collect.journal.jsonl", "eagle_config.json", "eagle_head.safetensors"]
    meta = json.loads((out / "eagle_config.json").read_text())
    assert meta["report"]["online"] and meta["report"]["prompt_window"] == 8 and meta["input_norm"] is False
    assert not EagleHead.load(out, CPU, torch.float32).input_norm
    monkeypatch.setattr(td, "generate_batch", lambda *a, **k: pytest.fail("--resume must reuse the journaled answers"))
    again = invoke(*common, "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "eagle_config.json").read_text())["report"]["heldout_top1"] == meta["report"]["heldout_top1"]


def test_train_draft_with_a_bfloat16_target(tmp_path, td_loader):
    """--target-dtype bfloat16: the target is loaded in bf16 (half the memory at 7B), the head still trains in fp32."""
    out = tmp_path / "head"
    result = invoke("--data", "synthetic", "--synthetic-events", "2000", "-n", "8", "--clips", "3", "--device", "cpu",
                    "--out", str(out), "--batch-size", "4", "--train-batch", "4", "--epochs", "1", "--max-new-tokens", "6",
                    "--target-dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert td_loader[-1].llm.dtype == torch.bfloat16
    assert EagleHead.load(out, CPU, torch.float32).fc.weight.dtype == torch.float32
    collection = json.loads((out / "collect.journal.jsonl").read_text().splitlines()[0])["collection"]
    assert collection["target_dtype"] == "bfloat16"
    bad = invoke("--data", "synthetic", "-n", "8", "--device", "cpu", "--out", str(tmp_path / "bad"), "--target-dtype", "int3")
    assert bad.exit_code == 2 and "int3" in bad.output


def test_nf4_target_without_bitsandbytes_is_refused_before_loading(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(td.EgptError, match=r"^--target-quant nf4 needs the bitsandbytes package \(pip install bitsandbytes\)\.$"):
        td.check_target_quant("nf4", torch.device("cuda"))
    td.check_target_quant("none", torch.device("cpu"))
