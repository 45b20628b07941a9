"""--vision-mode (issue 13): Stage 3's frame encoder gives the eager forward's features in every mode."""

from __future__ import annotations

import pytest
import torch

from egpt_speed.baselines.encode import check_input_options, input_facts
from egpt_speed.baselines.runner import RunConfig
from egpt_speed.errors import EgptError
from egpt_speed.stages import EncodedSample, PreprocessedSample, stage3_vision, stage3_vision_batch
from egpt_speed.vision_graph import FrameEncoder, resolve_vision_mode, use_vision_mode, vision_facts
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return make_tiny_eventgpt(3)


def pixels(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(frames, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_graph_mode_reuses_its_buffers_and_matches_eager_per_shape(model):
    encoder = FrameEncoder(model.encode_frames, "graph", CPU)
    with torch.inference_mode():
        for frames, seed in ((5, 0), (5, 1), (2, 2), (5, 3)):  # a second call of a shape must not return the first's output
            got = encoder(pixels(frames, seed))
            assert torch.equal(got, model.encode_frames(pixels(frames, seed)))
    assert sorted(shape[0][0] for shape in encoder.captured) == [2, 5]


def test_a_returned_output_survives_the_next_call(model):
    encoder = FrameEncoder(model.encode_frames, "graph", CPU)
    first = encoder(pixels(5, 0))
    kept = first.clone()
    encoder(pixels(5, 1))
    assert torch.equal(first, kept)


def test_compile_mode_matches_eager_in_float32(model):
    torch._dynamo.reset()
    encoder = FrameEncoder(model.encode_frames, "compile", CPU)
    with torch.inference_mode():
        expected = model.encode_frames(pixels(5, 4))
        torch.testing.assert_close(encoder(pixels(5, 4)), expected, rtol=1e-5, atol=1e-5)


def test_stage3_through_the_model_encoder_equals_the_plain_path(model):
    pres = [PreprocessedSample(None, pixels(5, seed), torch.tensor([1, -200, 2])) for seed in (5, 6)]
    plain = [stage3_vision(pre, model).event_features for pre in pres]
    assert use_vision_mode(model, "graph") == "graph"
    try:
        fast = [stage3_vision(pre, model).event_features for pre in pres]
        batched = [e.event_features for e in stage3_vision_batch(pres, model)]
        assert vision_facts(model) == {"vision_mode": "graph", "vision_attention": "sdpa", "vision_graph_fallback": None}
    finally:
        del model.frame_encoder
    for a, b, c in zip(plain, fast, batched):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)  # batched matmuls may reduce in another order


def test_vision_mode_is_resolved_and_checked_before_loading():
    assert resolve_vision_mode("auto", CPU) == "eager"
    assert resolve_vision_mode("auto", torch.device("cuda")) == "graph"
    assert resolve_vision_mode("compile", torch.device("cuda")) == "compile"
    with pytest.raises(EgptError, match="--vision-mode 'fast' is not one of"):
        check_input_options(RunConfig(strategies=["baseline"], vision_mode="fast"))


def test_the_result_records_the_vision_mode(model):
    use_vision_mode(model, "auto")
    try:
        facts = input_facts([], RunConfig(strategies=["baseline"]), model)
    finally:
        del model.frame_encoder
    assert facts["vision_mode"] == "eager" and facts["vision_attention"] == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_replay_equals_the_eager_forward():
    cuda = make_tiny_eventgpt(3).to("cuda")
    encoder = FrameEncoder(cuda.encode_frames, "graph", torch.device("cuda"))
    with torch.inference_mode():
        for seed in (0, 1):
            x = pixels(5, seed).cuda()
            torch.testing.assert_close(encoder(x), cuda.encode_frames(x), rtol=1e-5, atol=1e-5)
