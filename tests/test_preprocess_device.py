"""--preprocess device (issue 13): Stage 2 as tensor ops gives the CPU processor's pixels, features and tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egpt_speed.datasets import discover_samples
from egpt_speed.errors import EgptError
from egpt_speed.events import load_png_frames
from egpt_speed.hf_generate import generate_baseline
from egpt_speed.preprocess import check_preprocess, clip_spec, frames_pixel_values, max_pixel_diff
from egpt_speed.stages import (default_preprocess, make_request, preprocess_pixel_diff, stage1_load,
                               stage2_preprocess, stage3_vision, stage3_vision_batch)
from egpt_speed.decoding import GenerationSettings
from egpt_speed.timing import Clock
from egpt_speed.vision_tower import make_image_processor
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from helpers import make_sp_tokenizer

    tiny = make_tiny_eventgpt(0, tokenizer=make_sp_tokenizer(tmp_path_factory.mktemp("pp-tok")))
    with torch.no_grad():
        tiny.llm.lm_head.weight.mul_(8.0)  # sharper logits: fewer greedy near-ties
    return tiny


# Heights 1 and 3 are left out: transformers' processor then takes the height for the channel axis
# ("channel dimension is ambiguous") and crops the wrong axis, so there is no reference to match.
@pytest.mark.parametrize("size", [28, 336])
@pytest.mark.parametrize("hw", [(480, 640), (48, 64), (2, 2), (5, 700), (700, 5), (336, 336), (337, 500), (20, 15)])
def test_resize_crop_normalise_is_bit_exact_to_the_pil_processor(size, hw):
    processor = make_image_processor(size)
    image = np.random.default_rng(hw[0] * 1000 + hw[1]).integers(0, 256, (*hw, 3)).astype(np.uint8)
    reference = processor(images=[image], return_tensors="pt")["pixel_values"]
    ours = frames_pixel_values([image], clip_spec(processor), CPU, torch.float32)
    assert ours.shape == reference.shape == (1, 3, size, size)
    assert max_pixel_diff(ours, reference) == 0.0


def test_device_and_cpu_preprocess_agree_on_pixels_features_and_tokens(model, tiny_dataset):
    """The compare-equivalence check on CPU torch, fp32: same pixels, same event features, same greedy tokens."""
    settings = GenerationSettings(max_new_tokens=12)
    for spec in discover_samples(tiny_dataset):
        for frames in (5, 1):
            loaded = stage1_load(spec, "npy", frames)
            cpu, dev = (stage2_preprocess(loaded, model, frames, mode) for mode in ("cpu", "device"))
            assert torch.equal(cpu.pixel_values, dev.pixel_values) and torch.equal(cpu.prompt_ids, dev.prompt_ids)
            enc_cpu, enc_dev = stage3_vision(cpu, model), stage3_vision(dev, model)
            assert torch.equal(enc_cpu.event_features, enc_dev.event_features)
            tokens = [generate_baseline(model, make_request(e, settings), _clock()).token_ids for e in (enc_cpu, enc_dev)]
            assert tokens[0] == tokens[1] and len(tokens[0]) > 0
        assert preprocess_pixel_diff(loaded, model, frames) == 0.0


def test_png_source_on_the_device_matches_the_cpu_processor(model, tiny_dataset):
    spec = discover_samples(tiny_dataset)[0]
    loaded = stage1_load(spec, "png", 5)
    cpu, dev = (stage2_preprocess(loaded, model, 5, mode) for mode in ("cpu", "device"))
    assert torch.equal(cpu.pixel_values, dev.pixel_values)
    reference = model.image_processor(images=load_png_frames(spec.image_paths), return_tensors="pt")["pixel_values"]
    assert torch.equal(dev.pixel_values, reference)


def test_stage3_batched_across_samples_equals_one_at_a_time(model, tiny_dataset):
    pres = [stage2_preprocess(stage1_load(s, "npy", 5), model, 5, "device") for s in discover_samples(tiny_dataset)[:3]]
    batched = stage3_vision_batch(pres, model)
    for pre, enc in zip(pres, batched):
        single = stage3_vision(pre, model)
        assert enc.spec == single.spec and enc.event_features.shape == single.event_features.shape
        torch.testing.assert_close(enc.event_features, single.event_features, rtol=1e-5, atol=1e-6)


def test_preprocess_option_validation_and_default():
    assert check_preprocess("device") == "device" and check_preprocess("cpu") == "cpu"
    with pytest.raises(EgptError, match="--preprocess 'gpu' is not one of device, cpu"):
        check_preprocess("gpu")
    assert default_preprocess(torch.device("cpu")) == "cpu"
    assert default_preprocess(torch.device("cuda", 0)) == "device"


def test_a_processor_the_device_path_cannot_reproduce_is_refused(model, tiny_dataset):
    processor = make_image_processor(28)
    processor.resample = 2  # bilinear
    with pytest.raises(EgptError, match="use --preprocess cpu"):
        clip_spec(processor)
    processor = make_image_processor(28)
    processor.do_center_crop = False
    with pytest.raises(EgptError, match="configured otherwise"):
        clip_spec(processor)


def _clock() -> Clock:
    clock = Clock(CPU)
    clock.begin()
    return clock


def test_frames_of_mixed_sizes_are_resized_in_groups_exactly_as_one_by_one():
    from egpt_speed.preprocess import resize_crop, resize_crop_frames

    spec = clip_spec(make_image_processor(28))
    rng = np.random.default_rng(7)
    frames = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in
              [(48, 64), (50, 64), (48, 64), (30, 29), (50, 64)]]
    assert torch.equal(resize_crop_frames(frames, spec), torch.stack([resize_crop(f, spec) for f in frames]))
