"""Speculative decoding: the verifier's math, fp32 losslessness of the loop, and its sampled path."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from egpt_speed.decoding import DecodeRequest, GenerationSettings
from egpt_speed.drafts import check_shared_tokenizer, layer_truncated_view
from egpt_speed.eagle import EagleHead, head_config_from_target
from egpt_speed.errors import EgptError
from egpt_speed.hf_generate import generate_baseline
from egpt_speed.proposers import CausalLMProposer, EagleProposer, PromptLookupProposer, Proposer
from egpt_speed.speculation import DynamicTarget, speculative_decode
from egpt_speed.timing import Clock
from egpt_speed.verify import ChainDraft, greedy_accept, rejection_sample

VOCAB = 97
EOS = 2
EVENT = -200
CPU = torch.device("cpu")


def tiny_llama(seed: int, hidden: int = 64, layers: int = 2, vocab: int = VOCAB, sharpen: float = 8.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties, more structure
        model.lm_head.weight.mul_(sharpen)
    return model


class Multimodal:
    """The two things generate_baseline needs of an EventGPT: `llm` and `splice` (events at the −200)."""

    def __init__(self, llm):
        self.llm = llm

    def splice(self, prompt_ids: torch.Tensor, event_features: torch.Tensor) -> torch.Tensor:
        at = int((prompt_ids == EVENT).nonzero())
        embed = self.llm.get_input_embeddings()
        return torch.cat([embed(prompt_ids[:at]), event_features, embed(prompt_ids[at + 1:])]).unsqueeze(0).detach()


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return tiny_llama(0, layers=3)


@pytest.fixture(scope="module")
def model(target) -> Multimodal:
    return Multimodal(target)


def make_request(index: int, max_new_tokens: int = 24, **sampling) -> DecodeRequest:
    """Prompt `index`: text ids around one event placeholder (a repeated n-gram in some, for prompt lookup)."""
    generator = torch.Generator().manual_seed(100 + index)
    text = torch.randint(3, VOCAB, (6 + index % 4,), generator=generator)
    if index % 2:
        text = torch.cat([text, text[:3]])
    prompt = torch.cat([text[:2], torch.tensor([EVENT]), text[2:]])
    events = torch.randn(5, 64, generator=generator) * 0.5
    return DecodeRequest(f"p{index}", prompt, events, GenerationSettings(max_new_tokens=max_new_tokens, **sampling))


def baseline_tokens(model, request) -> list[int]:
    clock = Clock(CPU)
    clock.begin()
    return generate_baseline(model, request, clock).token_ids


def speculate(model, request, proposer, gamma: int = 4, stop_ids: set[int] | None = None, **loop):
    clock = Clock(CPU)
    clock.begin()
    embeds = model.splice(request.prompt_ids, request.event_features)
    return speculative_decode(DynamicTarget(model.llm), embeds, proposer, request.settings, gamma,
                              {EOS} if stop_ids is None else stop_ids, clock, **loop)


def init_head(llm) -> EagleHead:
    """An untrained head set up as train-draft starts it (the target's last layer, fc = identity on features)."""
    head = EagleHead(head_config_from_target(llm.config))
    with torch.no_grad():
        head.layer.load_state_dict(llm.model.layers[-1].state_dict())
        hidden = llm.config.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden].copy_(torch.eye(hidden))
        head.fc.bias.zero_()
    return head.eval()


def noisy_copy(llm, scale: float):
    """The target with every weight perturbed by `scale` of its spread: a strong, imperfect draft."""
    draft = copy.deepcopy(llm)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return draft


@pytest.fixture(scope="module")
def drafts(model) -> dict:
    return {"weak": layer_truncated_view(model.llm, 1), "strong": noisy_copy(model.llm, 0.03),
            "head": init_head(model.llm), "unrelated": tiny_llama(1, hidden=32, layers=1)}


def proposer_for(kind: str, model, request, drafts: dict) -> Proposer:
    embeds = model.splice(request.prompt_ids, request.event_features)
    text_ids = request.prompt_ids[request.prompt_ids != EVENT]
    if kind in ("weak", "strong"):  # the target's first layer (α ≈ 0.15) / a perturbed target (α ≈ 0.9)
        return CausalLMProposer(drafts[kind], prefix_embeds=embeds)
    if kind == "unrelated":  # another random model on the text only: (almost) always rejected
        return CausalLMProposer(drafts[kind], prefix_ids=text_ids)
    if kind == "eagle":
        return EagleProposer(drafts["head"], model.llm, embeds)
    return PromptLookupProposer(text_ids.tolist(), VOCAB, CPU, max_ngram=3)


class ScriptedProposer(Proposer):
    """Proposes the reference continuation, with a wrong token at chosen output positions."""

    def __init__(self, reference: list[int], wrong_at: set[int]):
        self.reference, self.wrong_at = reference, wrong_at

    def propose(self, committed, gamma, settings, generator) -> ChainDraft:
        start = len(committed)
        tokens = [(t + 1) % VOCAB if start + i in self.wrong_at else t
                  for i, t in enumerate(self.reference[start:start + gamma])]
        return ChainDraft(torch.tensor(tokens, dtype=torch.long))


# ---- the verifier on hand-built inputs ------------------------------------------------------

def test_greedy_accept_perfect_partial_and_first_mismatch():
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7, 9])) == (3, 9)
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([5, 8, 7, 9])) == (1, 8)
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([4, 6, 7, 9])) == (0, 4)
    assert greedy_accept(torch.tensor([], dtype=torch.long), torch.tensor([3])) == (0, 3)


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_reproduces_target_distribution():
    """First emitted token ~ p_target[0] exactly, whatever the draft; chi-square at p = 0.001."""
    p_target = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3]])
    p_draft = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5]])
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(5)
    for _ in range(20000):
        draft_token = torch.multinomial(p_draft[0], 1, generator=generator)
        accepted, bonus = rejection_sample(draft_token, p_draft, p_target, generator)
        counts[int(draft_token) if accepted == 1 else bonus] += 1
    assert chi_square(counts, p_target[0]) < 18.47, f"the sampler is biased ({counts.tolist()})"


def test_rejection_sampling_with_two_draft_tokens_reproduces_the_joint_distribution():
    """γ = 2, target and draft rows conditioned on the drafted prefix: (x1, x2) ~ p(x1)·p(x2 | x1) exactly."""
    p1 = torch.tensor([0.4, 0.3, 0.2, 0.1])
    p2 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.05, 0.05, 0.1, 0.8]])
    q1 = torch.tensor([0.1, 0.2, 0.3, 0.4])  # deliberately unlike the target
    q2 = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.6, 0.2, 0.1, 0.1]])
    generator = torch.Generator().manual_seed(3)
    counts = torch.zeros(4, 4)
    for _ in range(16000):
        d1 = int(torch.multinomial(q1, 1, generator=generator))
        d2 = int(torch.multinomial(q2[d1], 1, generator=generator))
        p_target = torch.stack([p1, p2[d1], torch.ones(4) / 4])  # [γ+1, V]
        accepted, bonus = rejection_sample(torch.tensor([d1, d2]), torch.stack([q1, q2[d1]]), p_target, generator)
        if accepted == 0:  # x1 is the bonus; x2 would come from the next step, drawn from the target's row
            x1, x2 = bonus, int(torch.multinomial(p2[bonus], 1, generator=generator))
        else:
            x1, x2 = d1, (d2 if accepted == 2 else bonus)
        counts[x1, x2] += 1
    assert chi_square(counts, p1[:, None] * p2) < 37.7  # 15 dof, p = 0.001


def test_rejection_sampling_bonus_after_full_acceptance_follows_last_target_row():
    p_target = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    p_draft = torch.tensor([[0.0, 1.0, 0.0]])  # always proposes 1, which the target always accepts
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(6000):
        accepted, bonus = rejection_sample(torch.tensor([1]), p_draft, p_target, generator)
        assert accepted == 1
        counts[bonus] += 1
    assert chi_square(counts, p_target[1]) < 13.82  # 2 dof, p = 0.001


def test_rejection_sampling_is_seeded_repeatable():
    p_target = torch.softmax(torch.randn(4, 11, generator=torch.Generator().manual_seed(3)), -1)
    p_draft = torch.softmax(torch.randn(3, 11, generator=torch.Generator().manual_seed(4)), -1)
    draft = torch.tensor([1, 2, 3])
    first = [rejection_sample(draft, p_draft, p_target, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert first[0] == first[1] == first[2]


# ---- fp32 losslessness of the loop against the baseline (HF generate) -----------------------

@pytest.mark.parametrize("kind", ["weak", "strong", "eagle", "pld"])
def test_greedy_speculation_equals_baseline_on_eight_prompts(model, drafts, kind):
    drafted = accepted = 0
    for index in range(8):
        request = make_request(index)
        result = speculate(model, request, proposer_for(kind, model, request, drafts), gamma=3 + index % 3)
        assert result.token_ids == baseline_tokens(model, request), f"prompt {index}"
        m = result.metrics
        drafted, accepted = drafted + m["drafted"], accepted + m["accepted"]
        if result.token_ids[-1] != EOS:  # every verify step commits its accepted drafts + one bonus token
            assert len(result.token_ids) == 1 + m["accepted"] + (m["target_forwards"] - 1)
    assert drafted > accepted > 0
    if kind == "weak":
        assert accepted / drafted < 0.5
    if kind == "strong":
        assert accepted / drafted > 0.7


def test_draft_equal_to_target_accepts_everything(model):
    request = make_request(0, max_new_tokens=41)  # 1 prefill token + 8 blocks of γ+1
    embeds = model.splice(request.prompt_ids, request.event_features)
    result = speculate(model, request, CausalLMProposer(model.llm, prefix_embeds=embeds), 4, stop_ids=set())
    m = result.metrics
    assert m["accept_rate"] == 1.0 and m["target_forwards"] == 9
    assert m["mean_accepted_tokens"] == 5.0  # τ: γ accepted + the bonus per verify step
    assert m["tokens_per_target_forward"] == pytest.approx(41 / 9)  # the prefill forward counted
    assert m["accepted_by_position"] == m["drafted_by_position"] == [8, 8, 8, 8]


def free_run(model, request) -> list[int]:
    clock = Clock(CPU)
    clock.begin()
    return generate_baseline(model, request, clock, eos_token_id=None).token_ids


def test_eos_arriving_as_the_correction_token_after_a_rejection(model):
    request = make_request(3, max_new_tokens=30)
    reference = free_run(model, request)
    # a first occurrence at a draft position (γ = 4 puts the bonus tokens at 5, 10, ...), not a bonus one
    index = next(i for i in range(6, 30) if i % 5 and reference[i] not in reference[:i])
    eos = reference[index]
    # the draft is right up to `index` and wrong there: the target rejects it and corrects with the EOS
    result = speculate(model, request, ScriptedProposer(reference, {index}), 4, stop_ids={eos})
    assert result.token_ids == reference[:index + 1]
    assert result.metrics["drafted"] > result.metrics["accepted"]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 7, 10])
@pytest.mark.parametrize("kind", ["weak", "unrelated", "oracle"])
def test_max_new_tokens_cuts_a_block(model, drafts, kind, max_new_tokens):
    request = make_request(5, max_new_tokens=max_new_tokens)
    reference = free_run(model, make_request(5, max_new_tokens=30))
    proposer = ScriptedProposer(reference, set()) if kind == "oracle" else proposer_for(kind, model, request, drafts)
    result = speculate(model, request, proposer, 4, stop_ids=set())
    assert result.token_ids == reference[:max_new_tokens]


class CheckedRollback(CausalLMProposer):
    """Records the draft cache's length after each rollback, beside what must be in it."""

    lengths: list[tuple[int, int]]

    def rollback(self, committed: list[int]) -> None:
        super().rollback(committed)
        self.lengths = getattr(self, "lengths", []) + [(self.cache.get_seq_length(), self.prefix_len + len(committed))]


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_draft_rollback_keeps_only_committed_tokens(model, drafts, kind):
    """After a rollback the draft cache holds the prefix + committed tokens but the pending one (or the
    last accepted draft too, which it never fed): a draft that keeps rejected tokens stays lossless
    but drafts from a wrong context."""
    request = make_request(4, max_new_tokens=30)
    proposer = CheckedRollback(drafts[kind], prefix_embeds=model.splice(request.prompt_ids, request.event_features))
    speculate(model, request, proposer, 4, stop_ids=set())
    assert proposer.lengths and all(full - 2 <= cached <= full - 1 for cached, full in proposer.lengths), proposer.lengths


def test_adaptive_gamma_stays_lossless(model, drafts):
    request = make_request(2, max_new_tokens=30)
    result = speculate(model, request, proposer_for("strong", model, request, drafts), 2, adaptive_gamma=True)
    assert result.token_ids == baseline_tokens(model, request)


# ---- the sampled path of the loop itself ------------------------------------------------------

class RecomputingTarget:
    """A Target that scores each call with one cache-free forward over the whole sequence, memoised by its
    tokens, so thousands of loop runs cost a few dozen forwards. Its logits are the LLM's own; the
    tempering, rejection sampling and bookkeeping under test are the loop's."""

    def __init__(self, llm, memo: dict):
        self.llm, self.memo, self.tokens = llm, memo, []
        self.last_hidden: torch.Tensor | None = None

    def _logits(self, tokens: tuple[int, ...]) -> torch.Tensor:
        """→ [len(tokens)+1, V]: after the last prefix position and after each token."""
        if tokens not in self.memo:
            ids = torch.tensor(tokens, dtype=torch.long)
            inputs = torch.cat([self.embeds, self.llm.get_input_embeddings()(ids)[None]], dim=1)
            self.memo[tokens] = self.llm(inputs_embeds=inputs).logits[0, self.embeds.shape[1] - 1:]
        return self.memo[tokens]

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        self.embeds, self.tokens = embeds, []
        self.last_hidden = torch.zeros(1, embeds.shape[1], 1)
        return self._logits(())[-1]

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        new = tokens[0].tolist()
        logits = self._logits(tuple(self.tokens + new))[len(self.tokens) + 1:]  # after each of `new`
        self.tokens += new
        self.last_hidden = torch.zeros(1, len(new), 1)
        return logits

    def crop(self, length: int) -> None:
        del self.tokens[length - self.embeds.shape[1]:]


class TableProposer(Proposer):
    """Samples each draft token from a fixed table q[previous token] (unlike the target)."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [V, V]

    def propose(self, committed, gamma, settings, generator) -> ChainDraft:
        tokens, rows, previous = [], [], committed[-1]
        for _ in range(gamma):
            rows.append(self.table[previous])
            previous = int(torch.multinomial(rows[-1], 1, generator=generator))
            tokens.append(previous)
        return ChainDraft(torch.tensor(tokens, dtype=torch.long), torch.stack(rows) if rows else None)


@pytest.fixture
def one_thread():
    """Thousands of tiny ops: on a busy machine, waking a second intra-op thread costs more than the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sampled_loop_follows_the_tempered_target_distribution_over_two_tokens(one_thread):
    """A LlamaForCausalLM with 4 tokens, a draft unlike it, γ = 2: the first two emitted tokens of thousands
    of seeded loop runs follow softmax(logits / T) of the target, computed here from its own forwards
    (x1 comes from the prefill, x2 through rejection sampling of the drafted d1, d2)."""
    target = tiny_llama(0, hidden=16, layers=1, vocab=4, sharpen=5.0)
    table = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.6, 0.2, 0.1, 0.1]])
    temperature, runs = 0.6, 3000
    embeds = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        p1 = torch.softmax(target(inputs_embeds=embeds).logits[0, -1] / temperature, -1)
        follow = torch.cat([embeds.expand(4, 3, 16), target.get_input_embeddings()(torch.arange(4))[:, None]], dim=1)
        p2 = torch.softmax(target(inputs_embeds=follow).logits[:, -1] / temperature, -1)  # [x1, x2]
    expected = p1[:, None] * p2
    assert float(expected.min()) > 0.01  # every cell observed ~30 times; untempered would give chi-square ~290
    counts, memo, clock = torch.zeros(4, 4), {}, Clock(CPU, enabled=False)
    for seed in range(runs):
        settings = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=temperature, seed=seed)
        tokens = speculative_decode(RecomputingTarget(target, memo), embeds, TableProposer(table), settings, 2, set(),
                                    clock).token_ids
        counts[tokens[0], tokens[1]] += 1
    assert chi_square(counts, expected) < 37.7, f"15 dof, p = 0.001: {counts.tolist()}"


def test_sampled_speculative_is_seeded_repeatable(model, drafts):
    request = make_request(1, max_new_tokens=20, do_sample=True, temperature=0.8, seed=7)
    outputs = [speculate(model, request, proposer_for("weak", model, request, drafts), 3, stop_ids=set()).token_ids
               for _ in range(2)]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 20


# ---- proposers and draft compatibility ------------------------------------------------------

def test_prompt_lookup_proposes_the_continuation_of_the_last_ngram():
    proposer = PromptLookupProposer([5, 6, 7, 8, 9], vocab_size=20, device=CPU, max_ngram=2)
    draft = proposer.propose([1, 6, 7], 3, GenerationSettings(), None)
    assert draft.tokens.tolist() == [8, 9, 1] and draft.p_draft is None
    assert proposer.propose([11, 12], 3, GenerationSettings(), None).tokens.tolist() == []


def test_early_exit_view_shares_weights(target):
    view = layer_truncated_view(target, 1)
    assert view.model.layers[0] is target.model.layers[0] and view.lm_head is target.lm_head
    assert len(view.model.layers) == 1


def test_draft_with_another_vocabulary_is_refused(target):
    fake_target = SimpleNamespace(llm=target, tokenizer=SimpleNamespace(bos_token_id=1, eos_token_id=2))
    with pytest.raises(EgptError, match="vocabulary of 50 ids but the target has 97"):
        check_shared_tokenizer(fake_target, tiny_llama(2, vocab=50), None, "other-draft")
    with pytest.raises(EgptError, match="eos_token_id"):
        check_shared_tokenizer(fake_target, tiny_llama(2), SimpleNamespace(bos_token_id=1, eos_token_id=5), "d")


@pytest.mark.parametrize("gamma", [1, 4])
def test_hf_assisted_generation_agrees_with_our_loop_on_the_text_only_path(target, gamma):
    from egpt_speed.strategies.hf_assisted import assisted_generate

    text_ids = torch.randint(3, VOCAB, (7,), generator=torch.Generator().manual_seed(5))
    draft = tiny_llama(1, hidden=32, layers=1)
    theirs = assisted_generate(target, draft, text_ids, 24, gamma, eos_token_id=None, pad_token_id=0)
    text_embeds = target.get_input_embeddings()(text_ids).unsqueeze(0).detach()
    clock = Clock(CPU)
    clock.begin()
    ours = speculative_decode(DynamicTarget(target), text_embeds, CausalLMProposer(draft, prefix_ids=text_ids),
                              GenerationSettings(max_new_tokens=24), gamma, set(), clock)
    assert ours.token_ids == theirs and len(theirs) == 24
