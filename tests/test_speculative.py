"""Speculative decoding: exact acceptance functions, fp32 losslessness, sampling correctness."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from egpt_speed.decoding import GenerationSettings
from egpt_speed.drafts import check_shared_tokenizer, layer_truncated_view
from egpt_speed.errors import EgptError
from egpt_speed.proposers import CausalLMProposer, PromptLookupProposer
from egpt_speed.speculation import DynamicTarget, speculative_decode
from egpt_speed.timing import Clock
from egpt_speed.verify import greedy_accept, rejection_sample

VOCAB = 97
CPU = torch.device("cpu")


def tiny_llama(seed: int, hidden: int = 64, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties, more structure
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return tiny_llama(0, layers=3)


@pytest.fixture(scope="module")
def prefix(target) -> tuple[torch.Tensor, torch.Tensor]:
    """A multimodal-like prefix: [1, 12, H] embeddings (random 'event' rows + token rows) and its text ids."""
    torch.manual_seed(5)
    text_ids = torch.randint(3, VOCAB, (7,))
    embeds = torch.cat([torch.randn(1, 5, 64) * 0.5, target.get_input_embeddings()(text_ids).unsqueeze(0)], dim=1)
    return embeds.detach(), text_ids


def reference_greedy(target, embeds, max_new_tokens: int, eos: int | None) -> list[int]:
    with torch.inference_mode():
        out = target.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0].tolist()


def run_spec(target, embeds, proposer, max_new_tokens, gamma, stop_ids):
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    clock = Clock(CPU)
    clock.begin()
    return speculative_decode(DynamicTarget(target), embeds, proposer, settings, gamma, stop_ids, clock)


# ---- standalone acceptance functions --------------------------------------------------------

def test_greedy_accept_perfect_partial_and_first_mismatch():
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7, 9])) == (3, 9)
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([5, 8, 7, 9])) == (1, 8)
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([4, 6, 7, 9])) == (0, 4)
    assert greedy_accept(torch.tensor([], dtype=torch.long), torch.tensor([3])) == (0, 3)


def test_rejection_sampling_reproduces_target_distribution():
    """First emitted token ~ p_target[0] exactly, whatever the draft; chi-square at p = 0.001."""
    p_target = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3]])
    p_draft = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5]])
    generator = torch.Generator().manual_seed(1234)
    trials = 20000
    counts = torch.zeros(5)
    for _ in range(trials):
        draft_token = torch.multinomial(p_draft[0], 1, generator=generator)
        accepted, bonus = rejection_sample(draft_token, p_draft, p_target, generator)
        counts[int(draft_token) if accepted == 1 else bonus] += 1
    expected = p_target[0] * trials
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 18.47, f"chi-square {chi_square:.1f} with 4 dof: the sampler is biased ({counts.tolist()})"


def test_rejection_sampling_bonus_after_full_acceptance_follows_last_target_row():
    p_target = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    p_draft = torch.tensor([[0.0, 1.0, 0.0]])  # always proposes 1, which the target always accepts
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(6000):
        accepted, bonus = rejection_sample(torch.tensor([1]), p_draft, p_target, generator)
        assert accepted == 1
        counts[bonus] += 1
    expected = p_target[1] * 6000
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.82  # 2 dof, p = 0.001


def test_rejection_sampling_is_seeded_repeatable():
    p_target = torch.softmax(torch.randn(4, 11, generator=torch.Generator().manual_seed(3)), -1)
    p_draft = torch.softmax(torch.randn(3, 11, generator=torch.Generator().manual_seed(4)), -1)
    draft = torch.tensor([1, 2, 3])
    first = [rejection_sample(draft, p_draft, p_target, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert first[0] == first[1] == first[2]


# ---- fp32 losslessness of the loop ----------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_equals_baseline_with_a_different_draft(target, prefix, gamma):
    embeds, text_ids = prefix
    draft = tiny_llama(1, hidden=32, layers=1)
    expected = reference_greedy(target, embeds, 40, eos=None)
    result = run_spec(target, embeds, CausalLMProposer(draft, prefix_ids=text_ids), 40, gamma, set())
    assert result.token_ids == expected
    assert result.metrics["drafted"] > 0
    assert result.metrics["target_forwards"] * 1 <= 40


def test_draft_equal_to_target_accepts_everything(target, prefix):
    embeds, _ = prefix
    gamma, max_new = 4, 41  # 1 prefill token + 8 blocks of γ+1
    result = run_spec(target, embeds, CausalLMProposer(target, prefix_embeds=embeds), max_new, gamma, set())
    assert result.token_ids == reference_greedy(target, embeds, max_new, eos=None)
    assert result.metrics["accept_rate"] == 1.0
    assert result.metrics["mean_accepted_tokens"] == 5.0  # τ: γ accepted + the bonus per verify step
    assert result.metrics["tokens_per_target_forward"] == pytest.approx(max_new / 9)  # prefill + 8 verifies
    assert result.metrics["accepted_by_position"] == result.metrics["drafted_by_position"]


def test_eos_inside_an_accepted_block_stops_exactly_like_baseline(target, prefix):
    embeds, _ = prefix
    free_run = reference_greedy(target, embeds, 30, eos=None)
    # an EOS id that first appears mid-way (index ≥ 3), so it lands inside a block of γ = 5
    index = next(i for i in range(3, 30) if free_run[i] not in free_run[:i])
    eos = free_run[index]
    expected = reference_greedy(target, embeds, 30, eos=eos)
    assert expected[-1] == eos and len(expected) == index + 1
    result = run_spec(target, embeds, CausalLMProposer(target, prefix_embeds=embeds), 30, 5, {eos})
    assert result.token_ids == expected


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 10])
def test_max_new_tokens_cut_mid_block(target, prefix, max_new_tokens):
    embeds, _ = prefix
    result = run_spec(target, embeds, CausalLMProposer(target, prefix_embeds=embeds), max_new_tokens, 5, set())
    assert result.token_ids == reference_greedy(target, embeds, max_new_tokens, eos=None)
    assert len(result.token_ids) == max_new_tokens


def test_early_exit_view_shares_weights_and_stays_lossless(target, prefix):
    embeds, _ = prefix
    view = layer_truncated_view(target, 1)
    assert view.model.layers[0] is target.model.layers[0] and view.lm_head is target.lm_head
    result = run_spec(target, embeds, CausalLMProposer(view, prefix_embeds=embeds), 25, 3, set())
    assert result.token_ids == reference_greedy(target, embeds, 25, eos=None)


def test_prompt_lookup_proposes_the_continuation_of_the_last_ngram():
    proposer = PromptLookupProposer([5, 6, 7, 8, 9], vocab_size=20, device=CPU, max_ngram=2)
    draft = proposer.propose([1, 6, 7], 3, GenerationSettings(), None)
    assert draft.tokens.tolist() == [8, 9, 1] and draft.p_draft is None
    assert proposer.propose([11, 12], 3, GenerationSettings(), None).tokens.tolist() == []


def test_prompt_lookup_is_lossless(target, prefix):
    embeds, text_ids = prefix
    proposer = PromptLookupProposer(text_ids.tolist(), VOCAB, CPU, max_ngram=3)
    result = run_spec(target, embeds, proposer, 30, 4, set())
    assert result.token_ids == reference_greedy(target, embeds, 30, eos=None)


def test_sampled_speculative_is_seeded_repeatable(target, prefix):
    embeds, text_ids = prefix
    draft = tiny_llama(1, hidden=32, layers=1)
    settings = GenerationSettings(max_new_tokens=20, do_sample=True, temperature=0.8, seed=7)
    outputs = []
    for _ in range(2):
        clock = Clock(CPU)
        clock.begin()
        outputs.append(speculative_decode(DynamicTarget(target), embeds, CausalLMProposer(draft, prefix_ids=text_ids), settings, 3,
                                          set(), clock).token_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 20


# ---- draft compatibility -------------------------------------------------------------------

def test_draft_with_another_vocabulary_is_refused(target):
    fake_target = SimpleNamespace(llm=target, tokenizer=SimpleNamespace(bos_token_id=1, eos_token_id=2))
    with pytest.raises(EgptError, match="vocabulary of 50 ids but the target has 97"):
        check_shared_tokenizer(fake_target, tiny_llama(2, vocab=50), None, "other-draft")
    with pytest.raises(EgptError, match="eos_token_id"):
        check_shared_tokenizer(fake_target, tiny_llama(2), SimpleNamespace(bos_token_id=1, eos_token_id=5), "d")


@pytest.mark.parametrize("gamma", [1, 4])
def test_hf_assisted_generation_agrees_with_our_loop_on_the_text_only_path(target, prefix, gamma):
    from egpt_speed.strategies.hf_assisted import assisted_generate

    _, text_ids = prefix
    draft = tiny_llama(1, hidden=32, layers=1)
    theirs = assisted_generate(target, draft, text_ids, 24, gamma, eos_token_id=None, pad_token_id=0)
    text_embeds = target.get_input_embeddings()(text_ids).unsqueeze(0).detach()
    ours = run_spec(target, text_embeds, CausalLMProposer(draft, prefix_ids=text_ids), 24, gamma, set())
    assert ours.token_ids == theirs
    assert len(theirs) == 24
