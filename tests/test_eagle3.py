"""EAGLE-3 heads draft: the target passes the inputs of three of its layers, the head fuses them (fc [H, 3H]),
drafts over its own vocabulary, and greedy float32 speculation equals greedy decoding (chain and tree).

The aux layer ids follow vLLM (model_executor/models/llama.py `aux_hidden_state_layers`: the hidden state
entering layer i, i.e. transformers' `hidden_states[i]`; default (2, L // 2, L - 3)) and the EAGLE repo's
EAGLE-3 target (modeling_llama_kv.py appends `hidden_states` before running layers 2, L // 2, L - 3).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from egpt_speed import eagle_formats as ef
from egpt_speed.decoding import GenerationSettings
from egpt_speed.eagle import head_config_from_target
from egpt_speed.errors import EgptError
from egpt_speed.proposers import EagleProposer
from egpt_speed.speculation import DynamicTarget, speculative_decode
from egpt_speed.timing import Clock
from egpt_speed.tree import TreeShape

CPU = torch.device("cpu")


def tiny_llm(layers: int = 6, vocab: int = 48, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def public_eagle3(llm, directory, aux: list[int] | None, draft_size: int = 24, stride: int = 2):
    """A random EAGLE-3 dir in vLLM's layout for `llm` (draft vocabulary: every `stride`-th id), imported back."""
    config = head_config_from_target(llm.config)
    torch.manual_seed(7)
    head = ef.Eagle3Head(config, aux or [], draft_size, llm.config.hidden_size)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, 0.3)
        head.draft_vocab.copy_(torch.arange(draft_size) * stride)
    directory.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in head.public_state().items()}, str(directory / "model.safetensors"))
    raw = config.to_dict() | {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": draft_size}
    if aux:
        raw["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if not k.startswith("_")}))
    return ef.load_public_head(directory, llm.config.hidden_size, llm.config.vocab_size, CPU, torch.float32)


def early_exit(head, llm) -> None:
    """Make `head` draft from its third aux state through the target's final norm and LM head (attention and MLP
    zeroed): a crude draft that the target still accepts now and then, so rollbacks after acceptance are exercised."""
    hidden = llm.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, 2 * hidden:] = torch.eye(hidden)
        head.layer.self_attn.o_proj.weight.zero_()
        head.layer.mlp.down_proj.weight.zero_()
        head.norm.weight.copy_(llm.model.norm.weight)
        head.lm_head.weight.copy_(llm.lm_head.weight[head.draft_vocab])


def prompt(llm, length: int = 10, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, llm.config.hidden_size, generator=generator) * 0.5  # [1, L, H]


def greedy_reference(llm, embeds: torch.Tensor, new: int) -> list[int]:
    with torch.inference_mode():
        return llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                            max_new_tokens=new, do_sample=False, eos_token_id=None)[0].tolist()


def test_the_target_passes_the_inputs_of_the_aux_layers(tmp_path):
    llm = tiny_llm()
    embeds = prompt(llm)
    target = DynamicTarget(llm, aux_layers=[0, 2, 5])
    with torch.inference_mode():
        target.prefill(embeds)
        states = llm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states  # (embeds, layer 0 out, ...)
    assert target.last_hidden.shape == (1, embeds.shape[1], 3 * 64)
    torch.testing.assert_close(target.last_hidden, torch.cat([states[0], states[2], states[5]], dim=-1))
    assert not any(layer._forward_pre_hooks for layer in llm.model.layers), "hooks live only during the forward"


def test_aux_layers_come_from_the_config_else_vllms_default(tmp_path):
    llm = tiny_llm(layers=8)
    named = public_eagle3(llm, tmp_path / "named", [1, 4, 6])
    default = public_eagle3(llm, tmp_path / "default", None)
    assert EagleProposer(named, llm, prompt(llm)).aux_layers == [1, 4, 6]
    assert EagleProposer(default, llm, prompt(llm)).aux_layers == [2, 4, 5]


@pytest.mark.parametrize("aux, gamma, tree", [([0, 3, 5], 3, None), (None, 4, None), ([0, 3, 5], 4, TreeShape(topk=4, max_nodes=12))])
def test_eagle3_greedy_fp32_equals_baseline(tmp_path, aux, gamma, tree):
    llm = tiny_llm(seed=2)
    head = public_eagle3(llm, tmp_path / "h", aux, draft_size=48, stride=1)
    early_exit(head, llm)
    embeds = prompt(llm)
    reference = greedy_reference(llm, embeds, 32)
    proposer = EagleProposer(head, llm, embeds)
    clock = Clock(CPU)
    clock.begin()
    result = speculative_decode(DynamicTarget(llm, aux_layers=proposer.aux_layers), embeds, proposer,
                                GenerationSettings(max_new_tokens=32), gamma, set(), clock, tree=tree)
    assert result.token_ids == reference
    assert result.metrics["accepted"] > 0


def test_an_eagle3_head_on_a_target_without_aux_states_is_refused(tmp_path):
    llm = tiny_llm()
    head = public_eagle3(llm, tmp_path / "h", [0, 3, 5])
    embeds = prompt(llm)
    clock = Clock(CPU)
    clock.begin()
    with pytest.raises(EgptError, match=r"reads target layers \[0, 3, 5\].*only its last layer"):
        speculative_decode(DynamicTarget(llm), embeds, EagleProposer(head, llm, embeds), GenerationSettings(max_new_tokens=8),
                           3, set(), clock)
    with pytest.raises(EgptError, match=r"reads target layers \[0, 3, 9\].*layers 0..5"):
        DynamicTarget(llm, aux_layers=[0, 3, 9])
