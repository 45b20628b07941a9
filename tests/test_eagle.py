"""EAGLE head: lossless drafting through the shared loop, and train-draft actually learns."""

from __future__ import annotations

import pytest
import torch

from egpt_speed import train_draft as td
from egpt_speed.datasets import discover_samples, load_questions
from egpt_speed.decoding import GenerationSettings
from egpt_speed.eagle import EagleHead, causal_mask, head_config_from_target
from egpt_speed.proposers import EagleProposer
from egpt_speed.speculation import DynamicTarget, speculative_decode
from egpt_speed.stages import stage1_load, stage2_preprocess, stage3_vision
from egpt_speed.timing import Clock
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(sp_tokenizer, tiny_dataset):
    model = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    specs = discover_samples(tiny_dataset)
    train_pairs, heldout_pairs = td.pairs_for(specs, load_questions(), 16, 0.2, 0)
    settings = GenerationSettings(max_new_tokens=20)
    sequences = td.collect_batch(model, train_pairs + heldout_pairs, settings, 5, batch_size=8)
    train, heldout = sequences[:len(train_pairs)], sequences[len(train_pairs):]
    head, loss, train_top1, heldout_top1 = td.train_head(model, train, heldout, 8, 1e-3, 0, batch_size=2)
    return model, specs, head, train, train_top1


def prefix_for(model, spec):
    encoded = stage3_vision(stage2_preprocess(stage1_load(spec, "npy", 5), model, 5), model)
    return model.splice(encoded.prompt_ids, encoded.event_features)


def test_causal_mask_with_cache_offset():
    mask = causal_mask(2, 3, torch.float32, CPU)[0, 0]
    allowed = mask == 0
    assert allowed.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_training_beats_an_untrained_head(trained):
    model, _, _, train, train_top1 = trained
    untrained = EagleHead(head_config_from_target(model.llm.config))
    assert train_top1 > td.top1(untrained, model.llm.lm_head, train, CPU) + 0.1


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_eagle_greedy_fp32_equals_baseline(trained, gamma):
    model, specs, head, _, _ = trained
    embeds = prefix_for(model, specs[0])
    with torch.inference_mode():
        reference = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                       max_new_tokens=30, do_sample=False, eos_token_id=None)[0].tolist()
    clock = Clock(CPU)
    clock.begin()
    result = speculative_decode(DynamicTarget(model.llm), embeds, EagleProposer(head, model.llm, embeds), GenerationSettings(max_new_tokens=30),
                                gamma, set(), clock)
    assert result.token_ids == reference
    assert result.metrics["drafted"] > 0


def test_head_round_trips_through_disk(trained, tmp_path):
    model, specs, head, _, _ = trained
    head.save(tmp_path / "head", extra={"target": "test"})
    loaded = EagleHead.load(tmp_path / "head", CPU, torch.float32)
    for name, tensor in head.state_dict().items():
        if not name.startswith("rotary."):
            torch.testing.assert_close(loaded.state_dict()[name], tensor.to(torch.bfloat16).float())
