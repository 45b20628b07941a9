"""`fused` (egpt_speed.fuse): stacked q/k/v and gate/up GEMMs give the unfused outputs, alone and under `compile`."""

from __future__ import annotations

import copy

import pytest
import torch

from egpt_speed.errors import EgptError
from egpt_speed.fuse import _FusedFollower, _FusedLead, fuse_projections
from helpers import make_tiny_eventgpt
from test_compile import decode, request_for

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(sp_tokenizer):
    tiny = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    with torch.no_grad():
        tiny.llm.lm_head.weight.mul_(4.0)
    return tiny


def test_fused_llm_gives_the_same_logits(model):
    fused = copy.deepcopy(model.llm)
    report = fuse_projections(fused)
    assert report.groups == 2 * report.layers
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.q_proj, _FusedLead) and isinstance(attention.v_proj, _FusedFollower)
    ids = torch.randint(3, model.llm.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = model.llm(input_ids=ids).logits, fused(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("decoder", ["baseline", "compile"])
def test_fused_decoding_is_token_identical(model, decoder):
    request = request_for(model, seed=3, text_len=6, events=5, max_new_tokens=12)
    expected = decode(decoder, model, request)
    assert decode(f"fused+{decoder}", copy.deepcopy(model), request) == expected


def test_fusing_twice_is_refused(model):
    fused = copy.deepcopy(model.llm)
    fuse_projections(fused)
    with pytest.raises(EgptError, match="already fused"):
        fuse_projections(fused)


def test_a_follower_called_first_fails_loudly(model):
    fused = copy.deepcopy(model.llm)
    fuse_projections(fused)
    attention = fused.model.layers[0].self_attn
    with pytest.raises(EgptError, match="before its group's first projection"):
        attention.k_proj(torch.zeros(1, 3, model.llm.config.hidden_size))


def test_fused_llm_traces_as_one_graph(model):
    """The handoff between lead and followers is plain Python state: dynamo must trace it without a graph break
    (compile captures `fullgraph=True`); the eager backend checks the tracing without inductor's build time."""
    fused = copy.deepcopy(model.llm)
    fuse_projections(fused)
    ids = torch.randint(3, model.llm.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(lambda x: fused(input_ids=x).logits, backend="eager", fullgraph=True)
    with torch.inference_mode():
        expected, got = model.llm(input_ids=ids).logits, compiled(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
