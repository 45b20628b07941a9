"""The suite's deprecation policy: a deprecated call from our modules is an error, one inside third-party code is not.

Probes are functions compiled with a chosen module name (`__name__`), which is what a warning filter matches.
The pyproject filters are applied here explicitly, so the test holds also under `-p no:warnings`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _pytest.config import parse_warning_filter
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

PROBE = '''
def call_with_deprecated_kwarg(llm, ids):
    return llm(input_ids=ids, past_key_values=cache_class(config=llm.config), use_cache=True)

def call_current_api(llm, ids):
    return llm(input_ids=ids, cache=cache_class(config=llm.config), use_cache=True)

def call_deprecated_function():
    return deprecated_function()
'''


def _deprecated_function() -> int:
    warnings.warn("deprecated_function is deprecated", DeprecationWarning, stacklevel=2)
    return 1


def probe(module: str) -> dict:
    namespace = {"__name__": module, "cache_class": DynamicCache, "deprecated_function": _deprecated_function}
    exec(compile(PROBE, f"<{module}>", "exec"), namespace)
    return namespace


@pytest.fixture
def project_filters(request):
    """Exactly the filterwarnings entries of pyproject.toml, on top of Python's defaults."""
    entries = request.config.getini("filterwarnings")
    assert any("egpt_speed" in entry for entry in entries), entries
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for entry in entries:
            warnings.filterwarnings(*parse_warning_filter(entry, escape=False))
        yield


@pytest.fixture(scope="module")
def llm():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 7]])


@pytest.mark.parametrize("module", ["egpt_speed.probe", "egpt_speed.strategies.probe"])
def test_deprecated_forward_kwarg_from_our_module_fails(module, project_filters, llm):
    with pytest.raises(FutureWarning, match="past_key_values"):
        probe(module)["call_with_deprecated_kwarg"](llm, IDS)
    with pytest.raises(DeprecationWarning, match="deprecated_function"):
        probe(module)["call_deprecated_function"]()


def test_deprecated_call_inside_third_party_code_only_warns(project_filters, llm):
    with warnings.catch_warnings(record=True) as caught:
        probe("somelibrary.internals")["call_with_deprecated_kwarg"](llm, IDS)
        probe("egpt_speed_lookalike")["call_deprecated_function"]()
    kinds = {type(w.message) for w in caught}
    assert kinds >= {FutureWarning, DeprecationWarning}, caught


def test_current_api_from_our_module_raises_nothing(project_filters, llm):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        output = probe("egpt_speed.probe")["call_current_api"](llm, IDS)
    assert output.logits.shape == (1, 3, 32)
