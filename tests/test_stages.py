"""The seed's six measurement errors, pinned: each test makes one of them impossible to reintroduce silently."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from torch import nn

from egpt_speed.baselines import encode as encode_module
from egpt_speed.baselines import runner
from egpt_speed.baselines.runner import RunConfig, StrategyState, decode_one, execute, interleaved_order, warmup_then_counted
from egpt_speed import metrics, results
from egpt_speed.datasets import discover_samples
from egpt_speed.decoding import GenerationSettings
from egpt_speed.eventgpt import EventGPT
from egpt_speed.vision_tower import make_image_processor
from egpt_speed.prompt import PromptTemplate, tokenize_with_event_placeholder
from egpt_speed.stages import stage1_load, stage2_preprocess, stage3_vision
from helpers import make_tiny_eventgpt
from egpt_speed.strategies.baseline import Baseline
from egpt_speed.strategies.registry import RunContext

CPU = torch.device("cpu")


class CallCounter:
    """Forward hooks counting calls and the frames (leading dim) passing through each module."""

    def __init__(self, **modules: nn.Module):
        self.calls: Counter = Counter()
        self.rows: Counter = Counter()
        for name, module in modules.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name] += 1
            self.rows[name] += inputs[0].shape[0] if inputs else 0
        return hook

    def reset(self) -> None:
        self.calls.clear()
        self.rows.clear()


def run_tiny(tmp_path, data, **overrides):
    """`execute` on the in-process tiny model (as `run`/`compare` would), hooks on its vision stack."""
    counters: list[CallCounter] = []
    tokenizer = overrides.pop("tokenizer")

    def load(spec, dtype, device, vision_tower=None, allow_tokenizer_mismatch=False):
        model = make_tiny_eventgpt(0, tokenizer=tokenizer)
        counters.append(CallCounter(vision_tower=model.vision_tower, projector=model.projector, adaptor=model.adaptor))
        return model

    config = dict(strategies=["baseline"], data=str(data), samples=2, warmup=1, max_new_tokens=6, device="cpu")
    config.update(overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "load_model", load)
        document, path = execute(RunConfig(**config), tmp_path / "out")
    return document, counters


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, tiny_dataset, sp_tokenizer):
    """baseline vs pld, 2 warm-up + 3 counted samples of a 6-clip dataset; Stage-1 calls recorded."""
    loads = []
    real_stage1 = encode_module.stage1_load

    def counting_stage1(spec, source, frames, family="eventgpt"):
        loads.append(spec.id)
        return real_stage1(spec, source, frames, family)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encode_module, "stage1_load", counting_stage1)
        document, counters = run_tiny(tmp_path_factory.mktemp("compare"), tiny_dataset, tokenizer=sp_tokenizer,
                                      strategies=["baseline", "pld"], samples=3, warmup=2)
    return document, counters, loads


# ---------------------------------------------------------------------------------- 1. ms per token


def test_per_token_ms_divides_decode_time_by_tokens_after_the_first():
    assert metrics.per_token_ms(90.0, 10) == 10.0  # the first token is prefill (TTFT)
    assert metrics.tokens_per_s(90.0, 10) == 100.0
    assert metrics.per_token_ms(90.0, 1) is None and metrics.tokens_per_s(90.0, 1) is None
    assert metrics.per_token_ms(0.0, 0) is None


def test_seed_worked_example_is_21_7_ms_per_token_not_0_6():
    # The seed: 988.4 ms of decoding for 45.5 decode steps on average → 21.7 ms/token.
    decode_ms, num_tokens = [988.4, 988.4], [46, 47]  # 45 + 46 steps after the first token
    per_token = metrics.aggregate_per_token_ms(decode_ms, num_tokens)
    assert per_token == pytest.approx(988.4 / 45.5) and round(per_token, 1) == 21.7
    summary = results.summarize([{"decode_ms": d, "num_tokens": n} for d, n in zip(decode_ms, num_tokens)])
    assert summary["per_token_ms"] == pytest.approx(21.723, abs=1e-3)
    assert summary["tokens_per_s"] == pytest.approx(1e3 / (988.4 / 45.5))


def test_run_level_ms_per_token_is_token_weighted_not_a_mean_of_ratios():
    samples = [{"decode_ms": 100.0, "num_tokens": 11}, {"decode_ms": 40.0, "num_tokens": 2}, {"decode_ms": 0.0, "num_tokens": 1}]
    summary = results.summarize(samples)
    assert summary["per_token_ms"] == pytest.approx(140.0 / 11)  # Σ decode / Σ (n − 1); one-token samples add nothing
    assert summary["tokens_per_s"] == pytest.approx(11 / 0.140)
    assert metrics.aggregate_per_token_ms([5.0], [1]) is None


def test_a_runs_summary_is_computed_from_its_own_samples(compare_run):
    document, _, _ = compare_run
    for run in document["runs"].values():
        samples, summary = run["samples"], run["summary"]
        steps = sum(s["num_tokens"] - 1 for s in samples)
        assert steps > 0
        assert summary["per_token_ms"] == pytest.approx(sum(s["decode_ms"] for s in samples) / steps)
        assert summary["tokens_per_s"] == pytest.approx(1e3 / summary["per_token_ms"])
        for s in samples:
            assert s["per_token_ms"] == pytest.approx(s["decode_ms"] / (s["num_tokens"] - 1))
            assert s["stage4_ms"] == pytest.approx(s["prefill_ms"] + s["decode_ms"])
            assert s["total_ms"] == pytest.approx(s["stage1_ms"] + s["stage2_ms"] + s["stage3_ms"] + s["stage4_ms"])
        assert summary["stage4_ms"] == pytest.approx(sum(s["stage4_ms"] for s in samples) / len(samples))


# ---------------------------------------------------------------------------------- 2. tokenisation is Stage 2


def test_tokenisation_is_timed_inside_stage_2(tmp_path, tiny_dataset, sp_tokenizer, monkeypatch):
    delay_s = 0.06
    calls = []
    in_stage2 = {"now": False}
    real_stage2 = encode_module.stage2_preprocess

    def slow_tokenize(prompt, tokenizer, fold_to_vocab=None):
        calls.append(in_stage2["now"])
        time.sleep(delay_s)
        return tokenize_with_event_placeholder(prompt, tokenizer, fold_to_vocab)

    def stage2(loaded, model, frames, preprocess="cpu"):
        in_stage2["now"] = True
        try:
            return real_stage2(loaded, model, frames, preprocess)
        finally:
            in_stage2["now"] = False

    monkeypatch.setattr("egpt_speed.stages.tokenize_with_event_placeholder", slow_tokenize)
    monkeypatch.setattr(encode_module, "stage2_preprocess", stage2)
    document, _ = run_tiny(tmp_path, tiny_dataset, tokenizer=sp_tokenizer, samples=2, warmup=1)
    assert calls == [True, True, True]  # once per sample (1 warm-up + 2 counted), always inside Stage 2
    for sample in document["runs"]["baseline"]["samples"]:
        assert sample["stage2_ms"] >= delay_s * 1e3  # a lower bound: the tokenizer's time is in Stage 2


# ---------------------------------------------------------------------------------- 3. warm-up excluded


def test_warmup_samples_run_but_are_not_counted(compare_run, tiny_dataset):
    document, _, loads = compare_run
    ids = [s.id for s in discover_samples(tiny_dataset)]
    assert loads == ids[3:5] + ids[:3]  # 2 warm-up clips first, then the 3 counted ones
    for run in document["runs"].values():
        counted = [s["id"] for s in run["samples"]]
        assert counted == ids[:3] and run["summary"]["samples"] == 3
        assert not set(ids[3:5]) & set(counted)
    assert document["config"]["warmup"] == 2 and document["config"]["samples"] == 3


def test_warmup_then_counted_plans():
    six = list("abcdef")
    assert warmup_then_counted(six, 3, 2) == [("d", False), ("e", False), ("a", True), ("b", True), ("c", True)]
    # one spare clip: both warm-ups use it, never a counted clip
    assert warmup_then_counted(six[:4], 3, 2) == [("d", False), ("d", False), ("a", True), ("b", True), ("c", True)]
    # short data: clips are reused, warm-up count and counted count still exact
    assert warmup_then_counted(six[:2], 3, 2) == [("a", False), ("b", False), ("a", True), ("b", True), ("a", True)]
    assert warmup_then_counted(six, 2, 0) == [("a", True), ("b", True)]


# ---------------------------------------------------------------------------------- 4. the official input


def test_pooling_gives_582_tokens_for_5_frames_and_578_for_1():
    frames = torch.randn(5, 577, 8)
    pooled = EventGPT.pool(frames)
    assert pooled.shape == (582, 8)
    torch.testing.assert_close(pooled[:5], frames.mean(dim=1))  # temporal tokens first, one per frame
    torch.testing.assert_close(pooled[5:], frames.mean(dim=0))  # then 577 spatial tokens
    single = EventGPT.pool(frames[:1])
    assert single.shape == (578, 8)
    torch.testing.assert_close(single[0], frames[0].mean(dim=0))
    torch.testing.assert_close(single[1:], frames[0])


@pytest.fixture(scope="module")
def clip336_model(sp_tokenizer):
    """EventGPT's token geometry (CLIP 336 px, patch 14 → 577 tokens/frame) with a 16-wide tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    base = make_tiny_eventgpt(1, tokenizer=sp_tokenizer)
    torch.manual_seed(1)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=1, image_size=336, patch_size=14)).eval()
    projector = nn.Sequential(nn.Linear(16, base.hidden_size), nn.GELU(), nn.Linear(base.hidden_size, base.hidden_size))
    return EventGPT(base.llm, tower, projector, nn.Linear(base.hidden_size, base.hidden_size), sp_tokenizer,
                    make_image_processor(336), PromptTemplate("eventgpt_v1"), name="clip336").eval()


@pytest.mark.parametrize("frames, tokens", [(5, 582), (1, 578)])
def test_stage3_output_is_the_official_input_and_the_adaptor_runs_once_per_frame(frames, tokens, clip336_model, tiny_dataset):
    model = clip336_model
    counter = CallCounter(vision_tower=model.vision_tower, adaptor=model.adaptor)
    spec = discover_samples(tiny_dataset)[0]
    pre = stage2_preprocess(stage1_load(spec, "npy", frames), model, frames)
    assert pre.pixel_values.shape == (frames, 3, 336, 336)
    counter.reset()
    encoded = stage3_vision(pre, model)
    assert encoded.event_features.shape == (tokens, model.hidden_size)
    assert counter.rows["adaptor"] == frames and counter.calls["adaptor"] == 1  # every frame exactly once
    assert counter.rows["vision_tower"] == frames
    with torch.no_grad():
        projected = model.projector(model.vision_tower(pre.pixel_values).last_hidden_state)
        once, twice = model.adaptor(projected), model.adaptor(model.adaptor(projected))
    torch.testing.assert_close(encoded.event_features, EventGPT.pool(once))
    assert not torch.allclose(encoded.event_features, EventGPT.pool(twice))


def test_runner_records_frames_mode_and_event_tokens(tmp_path, tiny_dataset, sp_tokenizer):
    document, counters = run_tiny(tmp_path, tiny_dataset, tokenizer=sp_tokenizer, samples=1, warmup=0, frames=1)
    sample = document["runs"]["baseline"]["samples"][0]
    assert document["config"]["frames"] == 1
    assert sample["event_tokens"] == document["config"]["event_tokens"] == 1 + 5  # T=1 + 5 tokens/frame (28 px)
    assert counters[0].rows["adaptor"] == 1 and counters[0].calls["adaptor"] == 1


def test_frames_other_than_5_or_1_are_refused():
    from egpt_speed.errors import EgptError

    with pytest.raises(EgptError, match="--frames 3"):
        runner.validate(RunConfig(strategies=["baseline"], frames=3, device="cpu"))


# ---------------------------------------------------------------------------------- 5. Stage 4 never re-encodes


def test_stage4_never_calls_the_vision_stack(sp_tokenizer, tiny_dataset):
    model = make_tiny_eventgpt(2, tokenizer=sp_tokenizer)
    counter = CallCounter(vision_tower=model.vision_tower, projector=model.projector, adaptor=model.adaptor)
    spec = discover_samples(tiny_dataset)[1]
    encoded = stage3_vision(stage2_preprocess(stage1_load(spec, "npy", 5), model, 5), model)
    assert counter.calls == Counter(vision_tower=1, projector=1, adaptor=1)
    counter.reset()
    state = StrategyState(Baseline(RunContext(device=CPU, dtype=torch.float32)), model)
    record = decode_one(state, encoded, GenerationSettings(max_new_tokens=5), CPU)
    assert 1 <= record["num_tokens"] <= 5 and record["token_ids"]
    assert sum(counter.calls.values()) == 0


def test_compare_encodes_each_sample_once_for_all_strategies(compare_run):
    document, counters, loads = compare_run
    assert len(counters) == 1  # neither strategy modifies the model: one shared base
    assert counters[0].calls["vision_tower"] == len(loads) == 5  # once per sample, not per strategy
    assert counters[0].calls["adaptor"] == 5 and counters[0].rows["adaptor"] == 25


# ---------------------------------------------------------------------------------- 6. agreement, one definition


@pytest.mark.parametrize("reference, candidate, exact, rate, divergence, prefix", [
    ([5, 6, 7], [5, 6, 7], True, 1.0, None, 3),  # identical
    ([5, 6, 7, 8], [5, 9, 7, 8], False, 0.75, 1, 1),  # early divergence: later positions still count as matches
    ([9, 6, 7, 8], [5, 6, 7, 8], False, 0.75, 0, 0),  # first token differs
    ([5, 6, 7, 8], [5, 6], False, 0.5, 2, 2),  # candidate stopped early: rate is over the reference length
    ([5, 6], [5, 6, 7], False, 1.0, 2, 2),  # candidate ran on: all reference positions match, not exact
    ([], [], True, 1.0, None, 0),  # both empty
    ([], [4], False, 0.0, 0, 0),
    ([4], [], False, 0.0, 0, 0),
])
def test_agreement_definitions(reference, candidate, exact, rate, divergence, prefix):
    result = metrics.agreement(reference, candidate)
    assert result.exact_match is exact
    assert result.token_match_rate == rate
    assert result.first_divergence == divergence
    assert result.common_prefix_len == prefix


def test_interleaved_order_alternates():
    assert [interleaved_order(2, i) for i in range(4)] == [[0, 1], [1, 0], [0, 1], [1, 0]]
    three = [interleaved_order(3, i) for i in range(3)]
    assert three == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert sorted(order[0] for order in three) == [0, 1, 2]  # each strategy goes first equally often
    assert interleaved_order(1, 7) == [0]


def test_compare_run_alternates_order_and_reports_agreement(compare_run):
    document, _, _ = compare_run
    baseline, pld = document["runs"]["baseline"]["samples"], document["runs"]["pld"]["samples"]
    # counted samples are plan positions 2, 3, 4: baseline first, second, first
    assert [s["order"] for s in baseline] == [0, 1, 0] and [s["order"] for s in pld] == [1, 0, 1]
    (comparison,) = document["comparisons"]
    assert comparison["reference"] == "baseline" and comparison["candidate"] == "pld"
    # pld is greedy-lossless: in float32 it reproduces the baseline tokens exactly
    assert [s["token_ids"] for s in pld] == [s["token_ids"] for s in baseline]
    assert comparison["exact_match_rate"] == 1.0 and comparison["token_match_rate"] == 1.0
    assert comparison["first_divergence_mean"] is None


def _sample(id_, stage4, total, tokens):
    return {"id": id_, "stage4_ms": stage4, "total_ms": total, "per_token_ms": stage4 / 10, "token_ids": tokens}


def test_compare_uses_per_sample_ratios_median_and_iqr():
    reference = [_sample("a", 100, 200, [1, 2, 3, 4]), _sample("b", 200, 400, [1, 2]), _sample("c", 300, 300, [7]),
                 _sample("d", 400, 800, [1, 2, 3, 4])]
    candidate = [_sample("a", 50, 100, [1, 2, 3, 4]), _sample("b", 100, 100, [1, 3]), _sample("c", 100, 300, [8]),
                 _sample("d", 400, 400, [1, 2, 3, 4])]
    result = results.compare("baseline", "fast", reference, candidate)
    # stage-4 ratios ref/cand per sample: 2, 2, 3, 1 → sorted 1, 2, 2, 3
    assert result["speedup_stage4_median"] == 2.0
    assert result["speedup_stage4_q1"] == pytest.approx(1.75) and result["speedup_stage4_q3"] == pytest.approx(2.25)
    # total ratios: 2, 4, 1, 2 → sorted 1, 2, 2, 4
    assert result["speedup_total_median"] == 2.0 and result["speedup_total_q3"] == pytest.approx(2.5)
    assert [p["speedup_stage4"] for p in result["per_sample"]] == [2.0, 2.0, 3.0, 1.0]
    assert result["speedup_stage4_median"] != pytest.approx(sum(r["stage4_ms"] for r in reference) / sum(c["stage4_ms"] for c in candidate))
    assert result["exact_match_rate"] == 0.5  # a and d
    assert result["token_match_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert result["first_divergence_mean"] == pytest.approx((1 + 0) / 2)
    assert result["samples"] == 4


def test_teacher_forced_top1_is_one_for_the_model_own_greedy_output_and_lower_for_another(sp_tokenizer):
    import torch

    from egpt_speed.decoding import DecodeRequest, GenerationSettings, teacher_forced_top1
    from helpers import make_tiny_eventgpt

    model = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    other = make_tiny_eventgpt(3, tokenizer=sp_tokenizer)
    ids = torch.tensor([1, 5, 6, -200, 7, 8])
    features = torch.randn(7, model.hidden_size)
    request = DecodeRequest("x", ids, features, GenerationSettings(max_new_tokens=12))
    embeds = model.splice(ids, features)
    with torch.inference_mode():
        greedy = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                    max_new_tokens=12, do_sample=False, eos_token_id=None)[0].tolist()
    assert teacher_forced_top1(model, request, greedy) == 1.0
    assert teacher_forced_top1(other, request, greedy) < 1.0


def test_no_cyclic_collection_runs_inside_a_timed_sample_and_each_samples_cycles_are_collected(tmp_path, tiny_dataset,
                                                                                                 sp_tokenizer):
    """A full collection can take hundreds of ms: none may land in a timed stage. Each Stage-4 call leaves a
    reference cycle behind; it must be gone when the next sample starts, and the collector is back after."""
    import gc
    import weakref

    seen, cycles = [], []
    real_decode_one = runner.decode_one

    class Cycle:
        pass

    def watching_decode_one(state, encoded, settings, device):
        seen.append((gc.isenabled(), sum(1 for ref in cycles if ref() is not None)))
        cycle = Cycle()
        cycle.me = cycle
        cycles.append(weakref.ref(cycle))
        del cycle
        return real_decode_one(state, encoded, settings, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "decode_one", watching_decode_one)
        run_tiny(tmp_path, tiny_dataset, tokenizer=sp_tokenizer, strategies=["baseline", "pld"], samples=2, warmup=1)
    assert len(seen) == 6
    assert all(enabled is False for enabled, _ in seen)
    # within a sample the first strategy's cycle is still alive at the second's start; none survives a sample
    assert [alive for _, alive in seen] == [0, 1, 0, 1, 0, 1]
    assert gc.isenabled() and gc.get_freeze_count() == 0
