"""Cross-modal speculative decoding: an EventGPT draft for a Video-LLaVA / LLaVA target and the reverse,
each model reading its own view of the same sample (events vs video frames), lossless in greedy fp32.

Tiny random models share one sentencepiece text vocabulary; the LLaVA family's tokenizer adds
``<image>`` and ``<video>`` beyond it, which the draft never proposes.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from egpt_speed.cli import app
from egpt_speed.cross_modal import SampleRequest, TokenMap, draft_prefix, text_vocab_map
from egpt_speed.datasets import discover_samples
from egpt_speed.decoding import GenerationSettings
from egpt_speed.errors import EgptError
from egpt_speed.hf_generate import generate_baseline
from egpt_speed.llava_family import load_llava_checkpoint
from egpt_speed.stages import stage1_load, stage2_preprocess, stage3_vision
from egpt_speed.strategies import registry
from egpt_speed.strategies.registry import RunContext
from egpt_speed.timing import Clock
from helpers import make_tiny_eventgpt, write_eventgpt_checkpoint
from test_llava_family import write_llava, write_video_llava

CPU = torch.device("cpu")
MAX_NEW = 12


@pytest.fixture(scope="module")
def llava_tokenizer(sp_tokenizer):
    import copy

    tokenizer = copy.deepcopy(sp_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def damp_attention(directory, factor: float = 0.1):
    """Scale the language model's attention outputs down: the next token then depends mostly on the
    last one, so two models sharing these weights agree although each reads its own prefix."""
    from transformers import VideoLlavaForConditionalGeneration

    model = VideoLlavaForConditionalGeneration.from_pretrained(str(directory))
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(factor)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory, llava_tokenizer):
    return damp_attention(write_video_llava(tmp_path_factory.mktemp("xm-video") / "video", llava_tokenizer))


def eventgpt_sharing_llm(target, tokenizer, seed: int = 3):
    """A tiny EventGPT whose language model is the target's (rows of the shared vocabulary only), so the
    draft agrees with the target often: acceptance paths get exercised, not only rejections."""
    draft = make_tiny_eventgpt(seed, hidden=target.hidden_size, tokenizer=tokenizer)
    shared = len(tokenizer)
    state = {key: (value[:shared] if key in ("model.embed_tokens.weight", "lm_head.weight") else value)
             for key, value in target.llm.state_dict().items()}
    draft.llm.load_state_dict(state)
    return draft


@pytest.fixture(scope="module")
def eventgpt_dir(tmp_path_factory, sp_tokenizer, video_dir):
    target = load_llava_checkpoint(video_dir, torch.float32, CPU)
    root = tmp_path_factory.mktemp("xm-egpt")
    return write_eventgpt_checkpoint(root / "eventgpt", model=eventgpt_sharing_llm(target, sp_tokenizer))


def started_clock() -> Clock:
    clock = Clock(CPU)
    clock.begin()
    return clock


def target_request(model, spec, source: str = "npy") -> SampleRequest:
    """The target's own Stages 1–3 on the sample, as the runner does them."""
    encoded = stage3_vision(stage2_preprocess(stage1_load(spec, source, 5, model.family), model, 5, "cpu"), model)
    return SampleRequest(spec.id, encoded.prompt_ids, encoded.event_features, GenerationSettings(max_new_tokens=MAX_NEW),
                         spec=spec)


def speculative_with(target, target_spec: str, draft_spec: str, gamma: int = 3):
    decoder = registry.build("speculative", RunContext(CPU, torch.float32, model_spec=target_spec, draft_spec=draft_spec,
                                                       gamma=gamma))
    decoder.prepare(target)
    return decoder


def test_eventgpt_draft_for_a_video_llava_target_is_lossless(video_dir, eventgpt_dir, tiny_dataset):
    target = load_llava_checkpoint(video_dir, torch.float32, CPU)
    decoder = speculative_with(target, str(video_dir), str(eventgpt_dir))
    assert decoder.draft.family == "eventgpt" and decoder.draft.own_stages is not None
    accepted = 0
    for spec in discover_samples(tiny_dataset)[:3]:
        request = target_request(target, spec)
        result = decoder.decode(target, request, started_clock())
        assert result.token_ids == generate_baseline(target, request, started_clock()).token_ids
        # the draft read the events (5 frames → its own prefix), not the target's video features
        assert result.metrics["draft_prefix_tokens"] != request.prompt_ids.numel() - 1 + request.event_features.shape[0]
        assert result.metrics["draft_stage123_ms"] >= result.metrics["draft_stage3_ms"] > 0
        assert len(result.metrics["drafted_by_position"]) == 3
        accepted += result.metrics["accepted"]
    assert accepted > 0  # the shared language model agrees often: accepted drafts were verified, not only rejected


def test_video_llava_draft_for_an_eventgpt_target_is_lossless(video_dir, sp_tokenizer, tiny_dataset):
    target = eventgpt_sharing_llm(load_llava_checkpoint(video_dir, torch.float32, CPU), sp_tokenizer, seed=5)
    decoder = speculative_with(target, "tiny", str(video_dir))
    assert decoder.draft.family == "video_llava"
    assert decoder.draft.token_map.mapped_out == ("<image>", "<video>")
    accepted = 0
    for spec in discover_samples(tiny_dataset)[:3]:
        request = target_request(target, spec)
        result = decoder.decode(target, request, started_clock())
        assert result.token_ids == generate_baseline(target, request, started_clock()).token_ids
        accepted += result.metrics["accepted"]
    assert accepted > 0


def test_sampled_cross_modal_run_is_seeded_and_uses_only_shared_ids(video_dir, sp_tokenizer, tiny_dataset):
    target = make_tiny_eventgpt(5, tokenizer=sp_tokenizer)
    decoder = speculative_with(target, "tiny", str(video_dir))
    spec = discover_samples(tiny_dataset)[0]
    request = target_request(target, spec)
    request.settings = GenerationSettings(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0, seed=7)
    first = decoder.decode(target, request, started_clock())
    assert decoder.decode(target, request, started_clock()).token_ids == first.token_ids
    assert all(token < len(sp_tokenizer) for token in first.token_ids)


def test_llava_target_maps_the_video_llava_placeholders(video_dir, tmp_path, llava_tokenizer):
    llava = load_llava_checkpoint(write_llava(tmp_path / "llava", llava_tokenizer), torch.float32, CPU)
    video = load_llava_checkpoint(video_dir, torch.float32, CPU)
    rows = llava.llm.get_output_embeddings().weight.shape[0]
    token_map = text_vocab_map(llava.tokenizer, rows, video.tokenizer, rows, "d")
    image = llava.tokenizer.convert_tokens_to_ids("<image>")
    assert token_map.shared == len(llava_tokenizer) and token_map.mapped_out == ()  # same placeholders, same ids
    assert token_map.draft_ids(torch.tensor([5, image])).tolist() == [5, image]

def test_token_map_keeps_shared_ids_and_masks_the_rest():
    token_map = TokenMap(shared=3, target_vocab=5, to_draft=torch.tensor([0, 1, 2, 0, 0]), mapped_out=("<image>",))
    assert token_map.target_logits(torch.tensor([1.0, 2.0, 3.0, 9.0])).tolist() == [1.0, 2.0, 3.0] + [float("-inf")] * 2
    assert token_map.draft_ids(torch.tensor([[2, 4]])).tolist() == [[2, 0]]


def test_a_draft_with_a_text_token_beyond_the_shared_vocabulary_is_refused(sp_tokenizer, tmp_path):
    import copy

    tokenizer = copy.deepcopy(sp_tokenizer)
    tokenizer.add_tokens(["scene!"])  # a text token, not a special placeholder: the vocabularies differ
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    directory = write_video_llava(tmp_path / "video", tokenizer)
    target = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    with pytest.raises(EgptError) as error:
        speculative_with(target, "tiny", str(directory))
    assert str(error.value) == (
        f"draft {directory} has token 'scene!' at id {len(sp_tokenizer)} where the target has no token; "
        "cross-modal drafting maps only added special tokens (such as <image>, <video>) beyond the shared text "
        "vocabulary, so the two tokenizers must agree on every other id.")


def test_draft_prefix_needs_the_sample(video_dir):
    video = load_llava_checkpoint(video_dir, torch.float32, CPU)
    with pytest.raises(EgptError, match="did not say which sample it is"):
        draft_prefix(video, None)


def test_cross_modal_compare_through_the_cli_reports_acceptance_by_position(video_dir, eventgpt_dir, tiny_dataset,
                                                                           tmp_path):
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["compare", "baseline", "speculative", "--model", str(video_dir), "--draft",
                                      str(eventgpt_dir), "--data", str(tiny_dataset), "-n", "2", "--warmup", "0",
                                      "--max-new-tokens", "8", "--device", "cpu", "--gamma", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("compare_baseline_vs_speculative_*.json")
    document = json.loads(path.read_text())
    assert document["comparisons"][0]["exact_match_rate"] == 1.0
    run = document["runs"]["speculative"]
    assert len(run["summary"]["speculation"]["acceptance_by_position"]) == 3
    assert all(sample["draft_stage3_ms"] > 0 for sample in run["samples"])
    assert run["settings"]["draft_family"] == "eventgpt"
    markdown = path.with_suffix(".md").read_text()
    assert "Cross-modal drafting" in markdown
    from benchmarks.families_table import cross_row, cross_table

    row = cross_row(document)  # what benchmarks/families_gpu.sh tabulates from the same file
    assert row["acceptance_by_position"] == run["summary"]["speculation"]["acceptance_by_position"]
    assert row["draft_family"] == "eventgpt" and row["target_family"] == "video_llava" and row["draft_stage3_ms"] > 0
    assert f"{row['exact_match_rate'] * 100:.0f} %" in cross_table([row])[-1]


def test_placeholders_at_other_ids_are_fed_to_the_draft_by_name(sp_tokenizer, llava_tokenizer):
    import copy

    draft_tokenizer = copy.deepcopy(sp_tokenizer)
    draft_tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})  # at the id of the target's <image>
    shared = len(sp_tokenizer)
    token_map = text_vocab_map(llava_tokenizer, shared + 2, draft_tokenizer, shared + 1, "d")
    assert token_map.shared == shared and token_map.mapped_out == ("<image>", "<video>")
    image, video = llava_tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    assert token_map.draft_ids(torch.tensor([7, video, image])).tolist() == [7, shared, sp_tokenizer.unk_token_id]
    assert token_map.target_logits(torch.ones(shared + 1))[shared:].tolist() == [float("-inf")] * 2


def test_a_draft_with_another_eos_is_refused(sp_tokenizer, llava_tokenizer):
    import copy

    draft_tokenizer = copy.deepcopy(sp_tokenizer)
    draft_tokenizer.eos_token = "<unk>"
    with pytest.raises(EgptError, match=r"^draft d has eos_token_id 0 but the target has 2; a draft must share"):
        text_vocab_map(llava_tokenizer, len(llava_tokenizer), draft_tokenizer, len(sp_tokenizer), "d")


def test_synthetic_clips_carry_video_frames_for_a_llava_family_draft_too():
    """`--model tiny --draft tiny-video-llava` on synthetic data: the draft reads the clip's video frames."""
    from egpt_speed.baselines.runner import RunConfig, needs_video_frames

    assert needs_video_frames(RunConfig(strategies=["speculative"], model="tiny", draft="tiny-video-llava"))
    assert needs_video_frames(RunConfig(strategies=["baseline"], model="tiny-llava"))
    assert not needs_video_frames(RunConfig(strategies=["speculative"], model="tiny", draft="tiny-eagle"))
    assert not needs_video_frames(RunConfig(strategies=["baseline"], model="tiny"))
