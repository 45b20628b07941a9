"""`compile`, `hf-static` and the static-cache engine: float32 token-for-token equality with `baseline`.

CPU tests run the static-cache path uncaptured; the CUDA-graph tests skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from egpt_speed.decoding import DecodeRequest, GenerationSettings, eos_ids
from egpt_speed.errors import EgptError
from egpt_speed.prompt import EVENT_TOKEN_INDEX
from egpt_speed.verify import greedy_accept
from egpt_speed.static_decode import StaticEngine, StaticTarget, round_up
from egpt_speed.timing import Clock
from helpers import make_tiny_eventgpt
from egpt_speed.strategies import registry
from egpt_speed.strategies.registry import RunContext

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def model(sp_tokenizer):
    tiny = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    with torch.no_grad():  # sharper logits: fewer near-ties, so equality tests the code, not rounding
        tiny.llm.lm_head.weight.mul_(4.0)
    return tiny


def request_for(model, seed: int, text_len: int, events: int, max_new_tokens: int) -> DecodeRequest:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    text = torch.randint(3, vocab, (text_len,), generator=generator)
    at = text_len // 2
    prompt_ids = torch.cat([torch.tensor([1]), text[:at], torch.tensor([EVENT_TOKEN_INDEX]), text[at:]])
    features = torch.randn(events, model.hidden_size, generator=generator) * 0.5
    return DecodeRequest(f"s{seed}", prompt_ids, features, GenerationSettings(max_new_tokens=max_new_tokens))


def decode(strategy_name: str, model, request: DecodeRequest, **options) -> list[int]:
    strategy = registry.build(strategy_name, RunContext(device=CPU, dtype=torch.float32, options=options))
    strategy.prepare(model)
    return run(strategy, model, request).token_ids


def run(strategy, model, request):
    clock = Clock(CPU)
    clock.begin()
    result = strategy.decode(model, request, clock)
    assert clock.first_token is not None, "the strategy never marked the first token"
    return result


def with_eos(model, token: int):
    """The same weights with `token` as the end-of-sequence id (generation config only)."""
    model.llm.generation_config.eos_token_id = token
    return model


@pytest.fixture
def eos_restored(model):
    saved = model.llm.generation_config.eos_token_id
    yield model
    model.llm.generation_config.eos_token_id = saved


# ---- compile == baseline in float32 -------------------------------------------------------------

@pytest.mark.parametrize("seed,text_len,events,max_new_tokens", [(0, 6, 5, 24), (1, 11, 9, 17), (2, 3, 14, 40), (3, 20, 2, 9)])
def test_compile_equals_baseline(model, seed, text_len, events, max_new_tokens):
    request = request_for(model, seed, text_len, events, max_new_tokens)
    expected = decode("baseline", model, request)
    assert decode("compile", model, request) == expected
    assert decode("compile", model, request, eos_every=3) == expected
    assert decode("compile", model, request, eos_every=8) == expected


@pytest.mark.parametrize("max_new_tokens", [1, 2, 8, 9, 10])
def test_max_new_tokens_cut_at_chunk_edges(model, max_new_tokens):
    request = request_for(model, 4, 8, 5, max_new_tokens)
    expected = decode("baseline", model, request)
    assert len(expected) == max_new_tokens or expected[-1] in eos_ids(model)
    assert decode("compile", model, request) == expected


@pytest.mark.parametrize("eos_at,eos_every", [(5, 8), (3, 1), (4, 4), (9, 8)])
def test_eos_mid_chunk_truncates_exactly(eos_restored, eos_at, eos_every):
    model = eos_restored
    request = request_for(model, 5, 10, 6, 30)
    free_run = decode("baseline", model, request)
    # pick as EOS a token first generated at index ≥ eos_at: the baseline then stops right there
    index = next(i for i in range(eos_at, len(free_run)) if free_run[i] not in free_run[:i])
    with_eos(model, free_run[index])
    expected = decode("baseline", model, request)
    assert expected == free_run[: index + 1]
    strategy = registry.build("compile", RunContext(device=CPU, dtype=torch.float32, options={"eos_every": eos_every}))
    strategy.prepare(model)
    result = run(strategy, model, request)
    assert result.token_ids == expected
    decoded_after_first = result.metrics["decode_steps"]
    assert decoded_after_first % eos_every == 0 or decoded_after_first == 29  # whole chunks, EOS checked per chunk
    assert result.metrics["wasted_steps"] == decoded_after_first + 1 - len(expected)


def test_first_token_eos_stops_before_decoding(eos_restored):
    model = eos_restored
    request = request_for(model, 6, 7, 4, 12)
    first = decode("baseline", model, request)[0]
    with_eos(model, first)
    strategy = registry.build("compile", RunContext(device=CPU, dtype=torch.float32))
    strategy.prepare(model)
    result = run(strategy, model, request)
    assert result.token_ids == decode("baseline", model, request) == [first]
    assert result.metrics["decode_steps"] == 0


def test_hf_static_equals_baseline(model):
    request = request_for(model, 7, 9, 6, 15)
    assert decode("hf-static", model, request) == decode("baseline", model, request)


def test_sampling_is_refused_clearly(model):
    request = request_for(model, 0, 5, 3, 4)
    request.settings = GenerationSettings(max_new_tokens=4, do_sample=True)
    strategy = registry.build("compile", RunContext(device=CPU, dtype=torch.float32))
    strategy.prepare(model)
    with pytest.raises(EgptError, match="greedily"):
        run(strategy, model, request)


def test_settings_say_uncaptured_on_cpu(model):
    strategy = registry.build("compile", RunContext(device=CPU, dtype=torch.float32))
    strategy.prepare(model)
    assert strategy.settings()["cuda_graph"] is False
    result = run(strategy, model, request_for(model, 0, 5, 3, 4))
    assert result.metrics["captured"] is False and result.metrics["cuda_graph"] is False
    assert "compile_ms" in result.metrics  # the first sample sets the engine up
    assert "compile_ms" not in run(strategy, model, request_for(model, 1, 5, 3, 4)).metrics


# ---- the engine: reuse, reset, setup twice ------------------------------------------------------

def engine_tokens(engine: StaticEngine, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
    clock = Clock(CPU)
    clock.begin()
    return engine.generate(embeds, max_new_tokens, set(), clock).token_ids


def spliced(model, request):
    with torch.inference_mode():
        return model.splice(request.prompt_ids, request.event_features)


def test_engine_reused_for_a_second_sample_equals_fresh(model):
    first, second = (spliced(model, request_for(model, s, 9, 7, 20)) for s in (10, 11))
    reused = StaticEngine(model.llm)
    engine_tokens(reused, first, 20)
    cache_before = reused.cache
    again = engine_tokens(reused, second, 20)
    assert reused.cache is cache_before, "a sample that fits must reuse the allocated cache"
    assert again == engine_tokens(StaticEngine(model.llm), second, 20)


def test_setup_twice_is_safe_and_grows_only_when_needed(model):
    engine = StaticEngine(model.llm)
    assert engine.setup(1, 40) > 0
    cache = engine.cache
    assert engine.setup(1, 40) == 0.0 and engine.setup(1, 10) == 0.0 and engine.cache is cache
    assert engine.setup(1, round_up(40) + 1) > 0 and engine.cache.max_len == 2 * round_up(40)
    embeds = spliced(model, request_for(model, 12, 6, 5, 12))
    assert engine_tokens(engine, embeds, 12) == engine_tokens(StaticEngine(model.llm), embeds, 12)
    with pytest.raises(EgptError, match="batch-1"):
        engine.setup(2, 40)


def test_decode_step_matches_decode_n(model):
    embeds = spliced(model, request_for(model, 13, 8, 6, 10))
    engine = StaticEngine(model.llm)
    engine.setup(1, embeds.shape[1] + 10)
    engine.reset()
    token = engine.prefill(embeds)[0][:, -1].argmax(-1, keepdim=True)
    stepped = []
    for offset in range(6):
        token = engine.decode_step(token, torch.tensor([embeds.shape[1] + offset])).clone()
        stepped.append(int(token))
    engine.reset()
    first = engine.prefill(embeds)[0][:, -1].argmax(-1, keepdim=True)
    assert engine.decode_n(first, embeds.shape[1], 6, set()) == stepped


def test_unsupported_attention_is_refused(model):
    from copy import deepcopy

    llm = deepcopy(model.llm)
    llm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(EgptError, match="attn_implementation"):
        StaticEngine(llm)


def test_eager_attention_equals_sdpa(model):
    from copy import deepcopy

    embeds = spliced(model, request_for(model, 14, 7, 5, 16))
    llm = deepcopy(model.llm)
    llm.set_attn_implementation("eager")
    assert engine_tokens(StaticEngine(llm), embeds, 16) == engine_tokens(StaticEngine(model.llm), embeds, 16)


# ---- StaticTarget: verify k+1 tokens, crop to the accepted ones, continue ----------------------

def greedy_reference(model, embeds, count: int) -> list[int]:
    return engine_tokens(StaticEngine(model.llm), embeds, count)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_static_target_verify_and_crop_reproduce_greedy(model, gamma):
    """Drafts that are right, wrong from the start, wrong in the middle, short (padded) and wider than γ."""
    embeds = spliced(model, request_for(model, 20 + gamma, 9, 6, 40))
    reference = greedy_reference(model, embeds, 40)
    target = StaticTarget(StaticEngine(model.llm), gamma)
    target.setup(embeds.shape[1] + 40)
    prefix_len = embeds.shape[1]
    vocab = model.llm.config.vocab_size
    with torch.inference_mode():
        committed = [int(target.prefill(embeds).argmax())]
    assert target.length == prefix_len
    step = 0
    while len(committed) < len(reference):
        truth = reference[len(committed):len(committed) + gamma + 3]
        k = [gamma, 0, gamma, max(gamma - 1, 0), gamma + 2][step % 5]  # k < γ pads; k > γ needs a wider verify
        wrong_from = [k, 0, k // 2, k, k][step % 5]
        drafts = [t if i < wrong_from else (t + 1) % vocab for i, t in enumerate(truth[:k])]
        drafts = torch.tensor(drafts, dtype=torch.long)
        with torch.inference_mode():
            logits = target.verify(torch.tensor([[committed[-1], *drafts.tolist()]]))  # [k+1, V]
        assert logits.shape[0] == len(drafts) + 1
        assert target.last_hidden.shape[:2] == (1, len(drafts) + 1)
        accepted, bonus = greedy_accept(drafts, logits.argmax(-1)) if len(drafts) else (0, int(logits[0].argmax()))
        committed += drafts[:accepted].tolist() + [bonus]
        target.crop(prefix_len + len(committed) - 1)
        step += 1
    assert committed[: len(reference)] == reference


def test_speculative_loop_on_a_static_target(model):
    from egpt_speed import speculation
    from egpt_speed.proposers import CausalLMProposer

    request = request_for(model, 30, 10, 6, 30)
    embeds = spliced(model, request)
    target = StaticTarget(StaticEngine(model.llm), 3)
    target.setup(embeds.shape[1] + 30)
    proposer = CausalLMProposer(model.llm, prefix_embeds=embeds)  # the target drafting itself
    clock = Clock(CPU)
    clock.begin()
    result = speculation.speculative_decode(target, embeds, proposer, request.settings, 3, eos_ids(model), clock)
    assert result.token_ids == decode("baseline", model, request)


@pytest.mark.parametrize("loop", ["pld", "early-exit"])
def test_compile_plus_speculative_loop_equals_baseline(model, loop):
    """compile lends the loop a StaticTarget."""
    for seed in (31, 32):
        request = request_for(model, seed, 12, 6, 30)
        assert decode(f"compile+{loop}", model, request) == decode("baseline", model, request)


# ---- CUDA graphs ----------------------------------------------------------------------------------

@needs_cuda
def test_captured_decode_equals_uncaptured_on_cuda(model):
    from copy import deepcopy

    cuda = torch.device("cuda")
    llm = deepcopy(model.llm).to(cuda)
    embeds = spliced(model, request_for(model, 40, 9, 6, 33)).to(cuda)
    captured, plain = StaticEngine(llm), StaticEngine(llm, cuda_graph=False)
    clock = Clock(cuda)
    clock.begin()
    result = captured.generate(embeds, 33, set(), clock)
    assert result.metrics["captured"] and result.metrics["cuda_graph"] and result.metrics["compile_ms"] > 0
    assert result.token_ids == plain.generate(embeds, 33, set(), clock).token_ids
    second = spliced(model, request_for(model, 41, 9, 6, 33)).to(cuda)
    assert captured.generate(second, 33, set(), clock).token_ids == plain.generate(second, 33, set(), clock).token_ids


@needs_cuda
@pytest.mark.parametrize("compile_mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_compiled_and_captured_decode_equals_eager_on_cuda(model, compile_mode):
    """The CUDA default (inductor + our capture) and torch.compile's own CUDA graphs, float32."""
    from copy import deepcopy

    cuda = torch.device("cuda")
    llm = deepcopy(model.llm).to(cuda)
    embeds = spliced(model, request_for(model, 43, 9, 6, 20)).to(cuda)
    clock = Clock(cuda)
    clock.begin()
    expected = StaticEngine(llm, cuda_graph=False).generate(embeds, 20, set(), clock).token_ids
    compiled = StaticEngine(llm, compile_mode=compile_mode)
    result = compiled.generate(embeds, 20, set(), clock)
    assert result.metrics["captured"] and result.token_ids == expected
    assert compiled.generate(embeds, 20, set(), clock).token_ids == expected


@needs_cuda
def test_captured_static_target_reproduces_greedy_on_cuda(model):
    from copy import deepcopy

    cuda = torch.device("cuda")
    llm = deepcopy(model.llm).to(cuda)
    embeds = spliced(model, request_for(model, 42, 9, 6, 24)).to(cuda)
    engine = StaticEngine(llm, cuda_graph=False)
    clock = Clock(cuda)
    clock.begin()
    reference = engine.generate(embeds, 24, set(), clock).token_ids
    target = StaticTarget(StaticEngine(llm), 3)
    target.setup(embeds.shape[1] + 24)
    with torch.inference_mode():
        committed = [int(target.prefill(embeds).argmax())]
        while len(committed) < 24:
            drafts = torch.tensor(reference[len(committed):len(committed) + 2] + [0], device=cuda)[:3]
            logits = target.verify(torch.cat([torch.tensor([committed[-1]], device=cuda), drafts]).unsqueeze(0))
            accepted, bonus = greedy_accept(drafts, logits.argmax(-1))
            committed += drafts[:accepted].tolist() + [bonus]
            target.crop(embeds.shape[1] + len(committed) - 1)
    assert target.engine.captured
    assert committed[:24] == reference


# ---- the padded prefill (PREFILL_BUCKET): what CUDA captures once per bucket, run uncaptured here ----

@pytest.mark.parametrize("text_len,events", [(5, 3), (14, 6), (40, 24), (62, 1)])
def test_padded_prefill_equals_the_unpadded_one(model, text_len, events):
    """Prompt lengths below, at and across a bucket edge (64), and a cache smaller than the bucket."""
    embeds = spliced(model, request_for(model, 30 + text_len, text_len, events, 12))
    plain = StaticEngine(model.llm, prefill_graphs=False)
    padded = StaticEngine(model.llm, prefill_graphs=True)
    for engine in (plain, padded):
        engine.setup(1, embeds.shape[1] + 12)
        engine.reset()
    with torch.inference_mode():
        (plain_logits, plain_features), (padded_logits, padded_features) = plain.prefill(embeds), padded.prefill(embeds)
    assert padded_logits.shape == plain_logits.shape and padded_features.shape == plain_features.shape
    torch.testing.assert_close(padded_logits, plain_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_features, plain_features, rtol=1e-5, atol=1e-5)
    assert padded.cache.length == plain.cache.length == embeds.shape[1]
    assert engine_tokens(padded, embeds, 12) == engine_tokens(plain, embeds, 12)  # the padding slots stay hidden


def test_padded_prefill_reuses_one_bucket_across_prompts(model):
    """Two prompts of one bucket share its buffers (a capture on CUDA); each still decodes its own answer."""
    engine = StaticEngine(model.llm, prefill_graphs=True)
    plain = StaticEngine(model.llm, prefill_graphs=False)
    for seed, text_len in ((50, 10), (51, 13)):
        embeds = spliced(model, request_for(model, seed, text_len, 5, 10))
        assert engine_tokens(engine, embeds, 10) == engine_tokens(plain, embeds, 10)
    assert len(engine._prefill_buffers) == 1


def test_an_inductor_config_is_in_force_while_the_step_compiles_and_not_after(model):
    """int8wo/int4wo+compile: torchao's inductor settings apply to our compile only, not to the process."""
    from torch._inductor import config as inductor_config

    from egpt_speed.quantize import TORCHAO_INDUCTOR_CONFIG, inductor_config_for

    assert inductor_config_for(model.llm) == {}  # plain float weights: no settings
    seen = []
    engine = StaticEngine(model.llm, compile_mode="default", inductor_config=TORCHAO_INDUCTOR_CONFIG)
    body = engine._decode_body

    def recording_body():
        seen.append(inductor_config.coordinate_descent_tuning)  # runs while dynamo traces, i.e. inside the compile
        body()
    engine._decode_body = recording_body
    before = inductor_config.coordinate_descent_tuning
    embeds = spliced(model, request_for(model, 61, 6, 3, 4))
    assert engine_tokens(engine, embeds, 4) == engine_tokens(StaticEngine(model.llm), embeds, 4)
    assert seen and seen[0] is True
    assert inductor_config.coordinate_descent_tuning == before is False


@pytest.mark.parametrize("choice, expected", [
    (None, {}),  # off unless asked for: the tuner's gain at 7B was 14 % in one run, 0.5 % in the next (H200)
    (False, {}),
    (True, {"coordinate_descent_tuning": True}),
])
def test_coordinate_descent_is_opt_in(choice, expected):
    """Even for the LLM it was once the default for (bfloat16 on CUDA, unfused): a stub that reports so."""
    from types import SimpleNamespace

    from egpt_speed.inductor_tuning import decode_inductor_config

    class CudaBfloat16LLM(torch.nn.Module):
        def get_input_embeddings(self):
            return SimpleNamespace(weight=SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16))

    assert decode_inductor_config(CudaBfloat16LLM(), choice) == expected


def test_coordinate_descent_compiles_the_step_under_it_and_decodes_the_same(model):
    """--coordinate-descent: the compiled step is traced under coordinate_descent_tuning, the process keeps its
    own setting, the settings record it, and the tokens equal the uncompiled engine's."""
    from torch._inductor import config as inductor_config

    strategy = registry.build("compile", RunContext(device=CPU, dtype=torch.float32,
                                                    options={"compile_mode": "default", "coordinate_descent": True}))
    strategy.prepare(model)
    assert strategy.settings()["inductor_config"] == {"coordinate_descent_tuning": True}
    seen, body = [], strategy.engine._decode_body

    def recording_body():
        seen.append(inductor_config.coordinate_descent_tuning)  # runs while dynamo traces, inside the compile
        body()
    strategy.engine._decode_body = recording_body
    request = request_for(model, 71, 7, 3, 6)
    assert run(strategy, model, request).token_ids == engine_tokens(StaticEngine(model.llm), spliced(model, request), 6)
    assert seen and seen[0] is True and inductor_config.coordinate_descent_tuning is False


def test_coordinate_descent_is_left_out_where_nothing_compiles(model):
    """On the CPU compile runs uncompiled unless --compile-mode says otherwise: no inductor settings to record."""
    strategy = registry.build("compile", RunContext(device=CPU, dtype=torch.float32, options={"coordinate_descent": True}))
    strategy.prepare(model)
    assert strategy.settings()["inductor_config"] is None


def test_compile_named_before_a_preparer_builds_on_the_prepared_llm(sp_tokenizer, monkeypatch):
    """compile+fused+pld (compile lends pld its target) must see the prepared (fused) LLM when it chooses its
    inductor settings, exactly like fused+compile+pld: the settings follow the LLM compile will compile (torchao's
    for a quantized one), so every preparer runs before it, wherever it is named."""
    import egpt_speed.strategies.compile as compile_module
    from egpt_speed.fuse import _FusedLead

    def is_fused(llm) -> bool:
        return any(isinstance(module, _FusedLead) for module in llm.modules())

    seen = []
    real = compile_module.decode_inductor_config
    monkeypatch.setattr(compile_module, "decode_inductor_config", lambda llm, choice: seen.append(is_fused(llm)) or real(llm, choice))
    for expression in ("compile+fused+pld", "fused+compile+pld", "compile+fused"):
        fresh = make_tiny_eventgpt(1, tokenizer=sp_tokenizer)
        strategy = registry.build(expression, RunContext(device=CPU, dtype=torch.float32, options={"compile_mode": "default"}))
        strategy.prepare(fresh)
    assert seen == [True, True, True]
