"""A plain causal-LM draft for a Llama-tokenizer target (Spec-Bench's SpS setting: a small model sharing the
target's vocabulary), loaded from a save_pretrained dir with `--draft DIR`, and the tokenizer check's errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from egpt_speed.cli import app
from egpt_speed.drafts import load_draft
from egpt_speed.errors import EgptError
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")


def write_draft_lm(directory, tokenizer, vocab: int, eos: int = 2) -> None:
    """A 1-layer Llama (the 68M Vicuna draft's shape, shrunk) with the target's sentencepiece tokenizer files."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def target(sp_tokenizer):
    return make_tiny_eventgpt(0, tokenizer=sp_tokenizer)


def test_a_draft_lm_with_the_targets_vocabulary_loads_as_a_text_only_draft(target, sp_tokenizer, tmp_path):
    write_draft_lm(tmp_path / "draft", sp_tokenizer, len(sp_tokenizer))
    draft = load_draft(str(tmp_path / "draft"), target, "tiny", CPU, torch.float32)
    assert not draft.multimodal and draft.head is None and draft.llm.config.num_hidden_layers == 1


def test_a_draft_with_another_vocabulary_is_refused_with_the_exact_error(target, sp_tokenizer, tmp_path):
    write_draft_lm(tmp_path / "draft", sp_tokenizer, len(sp_tokenizer) + 8)
    with pytest.raises(EgptError) as error:
        load_draft(str(tmp_path / "draft"), target, "tiny", CPU, torch.float32)
    assert str(error.value) == (f"draft {tmp_path / 'draft'} has a vocabulary of {len(sp_tokenizer) + 8} ids but the "
                                f"target has {len(sp_tokenizer)}; a draft must share the target's tokenizer.")


def test_a_draft_whose_tokenizer_has_another_eos_is_refused(target, sp_tokenizer, tmp_path):
    write_draft_lm(tmp_path / "draft", sp_tokenizer, len(sp_tokenizer))
    config = json.loads((tmp_path / "draft" / "tokenizer_config.json").read_text())
    config["eos_token"] = "<unk>"  # id 0, the target's EOS is 2
    (tmp_path / "draft" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(EgptError, match=r"has eos_token_id 0 but the target has 2; a draft must share the target's tokenizer"):
        load_draft(str(tmp_path / "draft"), target, "tiny", CPU, torch.float32)


def test_speculative_with_a_draft_lm_dir_is_lossless_through_the_cli(sp_tokenizer, tiny_dataset, tiny_loader, tmp_path):
    write_draft_lm(tmp_path / "draft", sp_tokenizer, len(sp_tokenizer))
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["compare", "baseline", "speculative", "--draft", str(tmp_path / "draft"),
                                      "--data", str(tiny_dataset), "-n", "2", "--warmup", "0", "--max-new-tokens", "8",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("compare_baseline_vs_speculative_*.json")
    document = json.loads(path.read_text())
    (comparison,) = document["comparisons"]
    assert comparison["exact_match_rate"] == 1.0  # greedy float32: the draft changes speed, never the answer
    assert all(sample["drafted"] > 0 for sample in document["runs"]["speculative"]["samples"])
