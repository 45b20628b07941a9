"""Stage 3 batched across the samples of a batch (issue 13 item 3): `encode_batch` vs per-sample `encode`."""

from __future__ import annotations

import pytest
import torch

from egpt_speed.baselines.encode import encode, encode_batch
from egpt_speed.baselines.runner import RunConfig
from egpt_speed.datasets import discover_samples
from helpers import make_tiny_eventgpt


@pytest.mark.parametrize("preprocess", ["cpu", "device"])
def test_batched_stage3_gives_the_per_sample_features_and_shares_its_time(tiny_dataset, sp_tokenizer, preprocess):
    model = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    specs = discover_samples(tiny_dataset)[:3]
    config = RunConfig(strategies=["batch"], preprocess=preprocess, batch_size=3)
    single = [encode(spec, config, model) for spec in specs]
    batched = encode_batch(specs, config, model, measure_diff=True)
    assert [c["id"] for _, c in batched] == [spec.id for spec in specs]
    for (one, one_common), (many, many_common) in zip(single, batched):
        torch.testing.assert_close(many.event_features, one.event_features, rtol=1e-5, atol=1e-6)
        assert torch.equal(many.prompt_ids, one.prompt_ids)
        assert many_common["stage3_batch_size"] == 3 and "stage3_batch_size" not in one_common
        assert many_common["event_tokens"] == one_common["event_tokens"]
        assert many_common["prompt_tokens"] == one_common["prompt_tokens"]
    assert len({c["stage3_ms"] for _, c in batched}) == 1  # the batch's time, shared
    assert ("preprocess_max_pixel_diff" in batched[0][1]) == (preprocess == "device")
    assert all("preprocess_max_pixel_diff" not in c for _, c in batched[1:])


def test_the_plan_is_encoded_in_order_in_groups_that_never_mix_warmup_and_counted(tiny_dataset, sp_tokenizer):
    from egpt_speed.baselines.encode import encode_plan

    model = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    specs = discover_samples(tiny_dataset)[:5]
    plan = [(specs[0], False), (specs[1], True), (specs[2], True), (specs[3], True), (specs[4], True)]
    config = RunConfig(strategies=["batch"], batch_size=2)
    grouped = list(encode_plan(plan, config, model, group=2, skip=1))
    assert [(i, c) for i, c, _, _ in grouped] == [(0, None), (2, 1), (3, 2), (4, 3)]
    assert [common.get("stage3_batch_size") for *_, common in grouped] == [1, 2, 2, 1]
    single = list(encode_plan(plan, config, model))
    assert [(i, c) for i, c, _, _ in single] == [(0, None), (1, 0), (2, 1), (3, 2), (4, 3)]
    assert all("stage3_batch_size" not in common for *_, common in single)
    for (_, _, a, _), (_, _, b, _) in zip(grouped[1:], single[2:]):
        torch.testing.assert_close(a.event_features, b.event_features, rtol=1e-5, atol=1e-6)
