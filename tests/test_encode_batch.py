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
