"""Divergence diagnosis: near-tie vs real, on hand-built numbers and on tiny in-process models (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from egpt_speed import divergence as dv
from egpt_speed.decoding import DecodeRequest, DecodeResult, GenerationSettings
from egpt_speed.hf_generate import generate_baseline
from egpt_speed.prompt import tokenize_with_event_placeholder
from egpt_speed.strategies import registry
from egpt_speed.strategies.registry import RunContext, Strategy
from egpt_speed.timing import Clock
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")
QUESTIONS = ("What is in the scene?", "Describe the objects, their colors, shapes and positions in detail.",
             "How many people?", "Is there any vehicle turning left or right at the intersection near the bridge?")
# lossless decoders that need nothing this machine lacks (a draft head, CUDA); hf-assisted decodes the
# text-only prompt (a different question), so it is not expected to equal the multimodal reference
WRONG_NAME = "test-replaces-one-token"
NOT_IN_PROCESS = {"hf-assisted", "eagle", "eagle-tree", WRONG_NAME}
WRONG_POSITION = 3


def started_clock() -> Clock:
    clock = Clock(CPU)
    clock.begin()
    return clock


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from helpers import make_sp_tokenizer

    return make_sp_tokenizer(tmp_path_factory.mktemp("divergence-tok"))


def sharp_model(tokenizer, dtype=torch.float32):
    """The tiny random EventGPT with sharper logits, as the other Stage-4 tests use it."""
    model = make_tiny_eventgpt(0, tokenizer=tokenizer, layers=3)
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(8.0)
    return model.to(dtype=dtype)


def requests_for(model, max_new_tokens: int = 12) -> list[DecodeRequest]:
    generator = torch.Generator().manual_seed(7)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    requests = []
    for index, (question, events) in enumerate(zip(QUESTIONS, (5, 9, 3, 7))):
        prompt = model.template.render(question, model.tokenizer)
        ids = torch.tensor(tokenize_with_event_placeholder(prompt, model.tokenizer, model.fold_to_vocab))
        features = (torch.randn(events, model.hidden_size, generator=generator) * 0.5).to(model.llm.dtype)
        requests.append(DecodeRequest(f"s{index}", ids, features, settings))
    return requests


def decode_all(name: str, model, requests, dtype) -> list[list[int]]:
    strategy = registry.build(name, RunContext(device=CPU, dtype=dtype, draft_spec="target",
                                               options={"exit_layer": 1}))
    own = copy.deepcopy(model) if strategy.modifies_model else model
    strategy.prepare(own)
    if strategy.batched:
        return [r.token_ids for r in strategy.decode_batch(own, requests, started_clock())]
    return [strategy.decode(own, r, started_clock()).token_ids for r in requests]


def in_process_lossless() -> list[str]:
    ctx = RunContext(device=CPU, dtype=torch.float32, draft_spec="target")
    names = []
    for name, cls in registry.available().items():
        if not cls.lossless or not cls.decodes or name in NOT_IN_PROCESS:
            continue
        if cls(ctx).unavailable_reason() is None:
            names.append(name)
    return names


# ---- the tolerance and the classification on hand-built numbers ------------------------------------

def test_tolerance_scales_with_the_dtypes_roundoff():
    hidden, w1, w2 = torch.ones(16), torch.full((16,), 0.5), torch.full((16,), 0.25)
    fp32 = dv.near_tie_tolerance(torch.float32, hidden, w1, w2, 8.0, 4.0)
    bf16 = dv.near_tie_tolerance(torch.bfloat16, hidden, w1, w2, 8.0, 4.0)
    # ‖h ⊙ (w1 − w2)‖₂ = 0.25·4 = 1; |z1| + |z2| = 12: tol = K · u · 13
    assert fp32 == pytest.approx(dv.NEAR_TIE_K * 2 ** -24 * 13)
    assert bf16 == pytest.approx(dv.NEAR_TIE_K * 2 ** -8 * 13)


class HandBuilt:
    """A stand-in reference model whose last position has chosen hidden state and LM-head rows."""

    def __init__(self, rows: torch.Tensor, hidden: torch.Tensor, dtype=torch.float32):
        self.llm = torch.nn.Module()
        self.rows, self.hidden, self.dtype = rows, hidden, dtype


def classify_hand_built(gap: float, dtype: torch.dtype, monkeypatch) -> dv.Divergence:
    """Vocab of 3: token 0 is top-1 at logit 10, token 1 at 10 − gap, token 2 far below."""
    hidden = torch.ones(4)
    rows = torch.tensor([[2.5] * 4, [(10.0 - gap) / 4] * 4, [0.0] * 4])  # [V, H] → logits 10, 10 − gap, 0
    model = HandBuilt(rows, hidden, dtype)
    monkeypatch.setattr(dv, "last_position_state", lambda m, r, p: (m.hidden, (m.rows @ m.hidden).double().float()))
    monkeypatch.setattr(dv, "logits_dtype", lambda m: m.dtype)
    model.llm.get_output_embeddings = lambda: torch.nn.Embedding.from_pretrained(rows)
    request = DecodeRequest("x", torch.tensor([1]), torch.zeros(1, 4), GenerationSettings())
    return dv.diagnose(model, request, [5, 0, 0], [5, 0, 1])


def test_a_tiny_float32_gap_is_a_near_tie_and_a_large_one_is_real(monkeypatch):
    tie = classify_hand_built(2e-6, torch.float32, monkeypatch)
    assert tie.kind == dv.NEAR_TIE and tie.position == 2 and tie.candidate_token == 1
    assert tie.candidate_logit_gap == pytest.approx(2e-6, abs=1e-6) and tie.candidate_logit_gap <= tie.tolerance
    real = classify_hand_built(0.5, torch.float32, monkeypatch)
    assert real.kind == dv.REAL and real.candidate_logit_gap == pytest.approx(0.5)


def test_the_same_gap_is_a_tie_in_bfloat16_but_real_in_float32(monkeypatch):
    assert classify_hand_built(0.05, torch.bfloat16, monkeypatch).kind == dv.NEAR_TIE
    assert classify_hand_built(0.05, torch.float32, monkeypatch).kind == dv.REAL
    assert classify_hand_built(5.0, torch.bfloat16, monkeypatch).kind == dv.REAL


def test_first_divergence_counts_a_length_difference():
    assert dv.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert dv.first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert dv.first_divergence([1, 2, 3], [1, 2]) == 2


def test_agreement_keys_count_exact_and_near_tie_samples_as_lossless():
    tie = dv.Divergence("b", 4, dv.NEAR_TIE, 0.1, 0.0, 0.2, 7, 8, True)
    real = dv.Divergence("c", 2, dv.REAL, 3.0, 3.0, 0.2, 7, 9, True)
    keys = dv.agreement_keys(["a", "b", "c", "d"], [None, tie, real, None])
    assert keys["real_divergence_count"] == 1 and keys["near_tie_count"] == 1
    assert keys["lossless_up_to_numerics_rate"] == pytest.approx(0.75)
    assert [d["id"] for d in keys["divergences"]] == ["b", "c"]
    assert set(keys["divergences"][0]) >= {"id", "position", "kind", "margin", "candidate_logit_gap"}


# ---- tiny in-process models -------------------------------------------------------------------------

def test_every_in_process_lossless_strategy_has_no_divergence_in_float32(tokenizer):
    model = sharp_model(tokenizer)
    requests = requests_for(model)
    reference = [generate_baseline(model, r, started_clock()).token_ids for r in requests]
    names = in_process_lossless()
    assert {"baseline", "speculative", "pld", "early-exit"} <= set(names)
    for name in names:
        tokens = decode_all(name, model, requests, torch.float32)
        found = [dv.diagnose(model, r, ref, cand) for r, ref, cand in zip(requests, reference, tokens)]
        assert found == [None] * len(requests), name


@pytest.mark.parametrize("name", ["speculative", "early-exit", "pld"])
def test_a_lossless_strategy_has_no_real_divergence_in_bfloat16(tokenizer, name):
    model = sharp_model(tokenizer, torch.bfloat16)
    requests = requests_for(model, max_new_tokens=24)
    reference = [generate_baseline(model, r, started_clock()).token_ids for r in requests]
    tokens = decode_all(name, model, requests, torch.bfloat16)
    found = [dv.diagnose(model, r, ref, cand) for r, ref, cand in zip(requests, reference, tokens)]
    keys = dv.agreement_keys([r.id for r in requests], found)
    assert keys["real_divergence_count"] == 0, keys["divergences"]
    assert keys["lossless_up_to_numerics_rate"] == 1.0


@registry.register
class ReplacesOneToken(Strategy):
    """A deliberately wrong decoder: the baseline's answer with one token swapped for its successor id."""

    name = WRONG_NAME
    summary = "baseline with token 3 replaced (tests only)"

    def decode(self, model, request, clock):
        tokens = generate_baseline(model, request, clock).token_ids
        tokens[WRONG_POSITION] = (tokens[WRONG_POSITION] + 1) % model.llm.config.vocab_size
        return DecodeResult(tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wrong_strategy_from_the_registry_is_classified_real(tokenizer, dtype):
    model = sharp_model(tokenizer, dtype)
    requests = requests_for(model)
    reference = [generate_baseline(model, r, started_clock()).token_ids for r in requests]
    tokens = decode_all(WRONG_NAME, model, requests, dtype)
    found = [dv.diagnose(model, r, ref, cand) for r, ref, cand in zip(requests, reference, tokens)]
    assert all(d is not None and d.position == WRONG_POSITION and d.kind == dv.REAL for d in found), found
    assert all(d.candidate_logit_gap > d.tolerance for d in found)
    assert dv.agreement_keys([r.id for r in requests], found)["lossless_up_to_numerics_rate"] == 0.0


def test_numerical_floor_of_a_float32_reference_is_zero_and_a_bfloat16_one_is_diagnosed(tokenizer):
    fp32 = sharp_model(tokenizer)
    requests = requests_for(fp32)
    decode = dv.hf_generate_tokens
    same = dv.numerical_floor(fp32, requests, [decode(fp32, r) for r in requests], torch.float32)
    assert same["differs_from_fp32"] == 0 and same["exact_match_rate_vs_fp32"] == 1.0
    bf16 = sharp_model(tokenizer, torch.bfloat16)
    bf16_requests = requests_for(bf16, max_new_tokens=24)
    bf16_tokens = [decode(bf16, r) for r in bf16_requests]
    floor = dv.numerical_floor(fp32, bf16_requests, bf16_tokens, torch.bfloat16)
    assert floor["samples"] == 4 and len(floor["divergences"]) == floor["differs_from_fp32"]
    assert "second" in floor["note"]


def test_comparison_keys_read_the_per_sample_diagnosis_and_count_undiagnosed_samples():
    tie = dv.Divergence("b", 1, dv.NEAR_TIE, 0.1, 0.0, 0.2, 7, 8, True).to_dict()
    reference = [{"token_ids": [1, 2, 3]}, {"token_ids": [1, 7, 3]}, {"token_ids": [1, 2]}]
    candidate = [{"token_ids": [1, 2, 3]}, {"token_ids": [1, 8, 3], dv.RECORD_KEY: tie}, {"token_ids": [1, 5]}]
    keys = dv.comparison_keys(reference, candidate)
    assert keys["near_tie_count"] == 1 and keys["real_divergence_count"] == 0 and keys["undiagnosed_count"] == 1
    assert keys["lossless_up_to_numerics_rate"] == pytest.approx(2 / 3)


# ---- through the runner: every comparison carries the diagnosis ---------------------------------------

def test_compare_diagnoses_every_divergence_and_reports_real_ones_loudly(tmp_path, tiny_dataset, tiny_loader):
    from egpt_speed.baselines.runner import RunConfig, execute

    config = RunConfig(strategies=["baseline", "speculative", WRONG_NAME], draft="target", data=str(tiny_dataset),
                       samples=2, warmup=0, max_new_tokens=6, dtype="float32", device="cpu")
    document, path = execute(config, tmp_path / "out")
    lossless, wrong = document["comparisons"]
    assert lossless["divergences"] == [] and lossless["lossless_up_to_numerics_rate"] == 1.0
    assert wrong["real_divergence_count"] == 2 and wrong["lossless_up_to_numerics_rate"] == 0.0
    assert [d["position"] for d in wrong["divergences"]] == [WRONG_POSITION] * 2
    assert "REAL DIVERGENCE" in path.with_suffix(".md").read_text()


def test_fp32_check_records_the_numerical_floor(tmp_path, tiny_dataset, tiny_loader):
    from egpt_speed.baselines.runner import RunConfig, execute

    config = RunConfig(strategies=["baseline", "pld"], data=str(tiny_dataset), samples=2, warmup=0, max_new_tokens=6,
                       dtype="bfloat16", device="cpu", fp32_check=True)
    document, path = execute(config, tmp_path / "out")
    floor = document["numerical_floor"]
    assert floor["samples"] == 2 and 0.0 <= floor["token_match_rate_vs_fp32"] <= 1.0
    assert tiny_loader[-1].llm.dtype == torch.float32  # the second copy the floor decoded with
    assert "numerical floor" in path.with_suffix(".md").read_text()


def test_fp32_check_refuses_sampling_before_loading(tiny_loader):
    from egpt_speed.baselines.runner import RunConfig, validate
    from egpt_speed.errors import EgptError

    with pytest.raises(EgptError, match="fp32-check"):
        validate(RunConfig(strategies=["baseline"], device="cpu", do_sample=True, fp32_check=True))
    assert tiny_loader == []
