"""EAGLE-1 / EAGLE-3 head formats: import, export, round trip, and errors naming the bad tensor.

Names and shapes follow the serving engines' loaders, read at these revisions:
- vLLM vllm/model_executor/models/llama_eagle.py @ 00da92319af4b2ad2cde8525b7b609c779bdc52f: fc [H, 2H] over
  cat(input_embeds, hidden_states) (bias=False there: fc.bias is skipped), layers.0 with input_layernorm = Identity,
  embed_tokens / lm_head shared with the target.
- vLLM vllm/model_executor/models/llama_eagle3.py @ 00bd1493b3e82d6c13c68ee8a0e1c5a96707e190: midlayer. → layers.0.,
  qkv input 2H = cat(input_layernorm(embeds), hidden_norm(hidden)), fc [H, 3H] (target_hidden_size × 3),
  norm, lm_head [draft_vocab_size, H], d2t → draft_id_to_target_id (target = draft index + d2t), t2d skipped,
  aux layers from eagle_config.eagle_aux_hidden_state_layer_ids; registry name LlamaForCausalLMEagle3.
- SGLang python/sglang/srt/models/llama_eagle.py @ 034b3be819faf3f84c5aae5a4cda27bdf2e12de0 (fc with bias,
  same cat order, layer 0 input_layernorm skipped) and llama_eagle3.py @ 03d5a7771f6082e7737a5f19cae7d1e863087013
  (midlayer.hidden_norm, hot_token_id = d2t + arange, lm_head = embed_tokens when tie_word_embeddings).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from egpt_speed import eagle_formats as ef
from egpt_speed.cli import app
from egpt_speed.decoding import GenerationSettings
from egpt_speed.drafts import load_draft
from egpt_speed.eagle import EagleHead, head_config_from_target
from egpt_speed.errors import EgptError
from egpt_speed.proposers import EagleProposer
from helpers import make_tiny_eventgpt

CPU = torch.device("cpu")
GREEDY = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def target(sp_tokenizer):
    return make_tiny_eventgpt(0, tokenizer=sp_tokenizer)


def random_head(target, input_norm: bool, seed: int = 3) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(head_config_from_target(target.llm.config), input_norm=input_norm)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, 0.2)
    return head.eval()


def prefix(target, length: int = 12, seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, target.llm.config.vocab_size, (1, length), generator=generator)
    return target.llm.get_input_embeddings()(ids).detach()  # [1, L, H]


def drafts(head, target, features: torch.Tensor, embeds: torch.Tensor) -> tuple[list[int], list[int]]:
    """(a greedy chain of 5, a 3-level top-4 tree's tokens) drafted from `features` [1, L, W]."""
    out = []
    for tree in (False, True):
        proposer = EagleProposer(head, target.llm, embeds)
        proposer.observe(features)
        with torch.no_grad():
            if tree:
                out.append(proposer.propose_tree([7], 3, 4, 10, GREEDY, None).tokens)
            else:
                out.append(proposer.propose([7], 5, GREEDY, None).tokens.tolist())
    return out[0], out[1]


def target_features(target, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return target.llm.model(inputs_embeds=embeds).last_hidden_state


def test_eagle1_export_has_the_engines_names_and_shapes_and_imports_to_the_same_drafts(target, tmp_path):
    head = random_head(target, input_norm=False)
    head.draft_vocab = None
    head.save(tmp_path / "ours")
    saved = EagleHead.load(tmp_path / "ours", CPU, torch.float32)  # bf16 on disk: compare with what was saved
    notes = ef.export_head(tmp_path / "ours", "eagle", tmp_path / "public")
    assert any("fc.bias" in note for note in notes)
    state = load_file(str(tmp_path / "public" / "model.safetensors"))
    config = json.loads((tmp_path / "public" / "config.json").read_text())
    hidden = target.hidden_size
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
    assert state["fc.weight"].shape == (hidden, 2 * hidden) and state["fc.bias"].shape == (hidden,)
    assert not any("input_layernorm" in name for name in state)
    assert {name for name in state if not name.startswith("fc.")} == {
        f"layers.0.{part}.weight" for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                               "post_attention_layernorm")}
    assert ef.detect_format(tmp_path / "public") == ef.EAGLE1
    imported = load_draft(str(tmp_path / "public"), target, "x", CPU, torch.float32).head
    assert not imported.input_norm and imported.draft_vocab is None
    embeds = prefix(target)
    features = target_features(target, embeds)
    chain, tree = drafts(saved, target, features, embeds)
    assert drafts(imported, target, features, embeds) == (chain, tree)
    assert len(set(chain)) > 1, "a random head should not draft one token over and over"


def test_an_eagle1_head_reads_embedding_first_as_the_engines_do(target, tmp_path):
    """The public fc multiplies cat(embedding, feature): compute that by hand and compare with the import."""
    hidden = target.hidden_size
    torch.manual_seed(0)
    donor = random_head(target, input_norm=False, seed=9)
    public = {"fc.weight": torch.randn(hidden, 2 * hidden) * 0.1, "fc.bias": torch.randn(hidden) * 0.1}
    public.update({f"layers.0.{k}": v for k, v in donor.layer.state_dict().items()})
    (tmp_path / "h").mkdir()
    torch.save(public, tmp_path / "h" / "pytorch_model.bin")
    (tmp_path / "h" / "config.json").write_text(json.dumps(head_config_from_target(target.llm.config).to_dict()))
    imported = ef.load_eagle1(tmp_path / "h", CPU, torch.float32)
    features, embeds = torch.randn(1, 6, hidden), torch.randn(1, 6, hidden)
    positions = torch.arange(6)
    with torch.no_grad():
        fused = torch.nn.functional.linear(torch.cat([embeds, features], -1), public["fc.weight"], public["fc.bias"])
        expected = donor.layer(fused, attention_mask=None, position_ids=positions[None],
                               position_embeddings=donor.rotary(fused, positions[None]))
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(imported(features, embeds, positions), expected)


def write_public(directory, state, config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.pop("layers.0.mlp.down_proj.weight"), "missing layers.0.mlp.down_proj.weight"),
    (lambda s: s.update({"fc.weight": s["fc.weight"][:, :10]}), "misshapen fc.weight (64, 10) (expected (64, 128))"),
    (lambda s: s.update({"layers.0.self_attn.q_proj.weight": torch.zeros(3, 64)}), "layers.0.self_attn.q_proj.weight (3, 64)")])
def test_a_broken_eagle1_head_names_the_tensor(target, tmp_path, change, needle):
    head = random_head(target, input_norm=False)
    state = {"fc.weight": ef.swap_halves(head.fc.weight.detach())}
    state.update({f"layers.0.{k}": v for k, v in head.layer.state_dict().items()})
    change(state)
    write_public(tmp_path / "h", state, head.config.to_dict())
    with pytest.raises(EgptError) as error:
        load_draft(str(tmp_path / "h"), target, "x", CPU, torch.float32)
    assert needle in str(error.value)


def test_a_head_with_an_input_norm_is_refused_for_eagle1_and_ours_for_eagle3(target, tmp_path):
    random_head(target, input_norm=True).save(tmp_path / "ours")
    with pytest.raises(EgptError, match="input norm.*--eagle1-layout"):
        ef.export_head(tmp_path / "ours", "eagle", tmp_path / "out")
    with pytest.raises(EgptError, match="no exact EAGLE-3"):
        ef.export_head(tmp_path / "ours", "eagle3", tmp_path / "out")
    result = CliRunner().invoke(app, ["export-draft", str(tmp_path / "ours"), "--format", "medusa", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.strip() == "error: --format 'medusa' is not supported; use auto, eagle or eagle3."


def eagle3_public(target, directory, draft_size: int = 40, aux: tuple[int, ...] = (1, 1, 2)):
    """A public EAGLE-3 dir for `target` (random weights, a draft vocabulary of every third id)."""
    config = head_config_from_target(target.llm.config)
    torch.manual_seed(4)
    head = ef.Eagle3Head(config, list(aux), draft_size, target.hidden_size)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, 0.2)
        head.draft_vocab.copy_(torch.arange(draft_size) * 3)
    state = head.public_state()
    raw = config.to_dict() | {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": draft_size,
                              "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux)}}
    write_public(directory, state, {k: v for k, v in raw.items() if not k.startswith("_")})
    return head.eval()


def test_eagle3_import_export_round_trip_drafts_the_same_tokens(target, tmp_path):
    made = eagle3_public(target, tmp_path / "public")
    hidden, vocab = target.hidden_size, target.llm.config.vocab_size
    state = load_file(str(tmp_path / "public" / "model.safetensors"))
    assert state["fc.weight"].shape == (hidden, 3 * hidden) and state["lm_head.weight"].shape == (40, hidden)
    assert state["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * hidden
    assert state["midlayer.hidden_norm.weight"].shape == (hidden,)
    assert state["d2t"].tolist() == [2 * i for i in range(40)] and state["t2d"].shape == (vocab,)
    assert int(state["t2d"].sum()) == 40
    assert ef.detect_format(tmp_path / "public") == ef.EAGLE3
    imported = ef.load_public_head(tmp_path / "public", hidden, vocab, CPU, torch.float32)
    ef.export_head(tmp_path / "public", "eagle3", tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 40
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 1, 2] and not config["tie_word_embeddings"]
    again = ef.load_public_head(tmp_path / "again", hidden, vocab, CPU, torch.float32)
    embeds = prefix(target)
    fused = torch.randn(1, embeds.shape[1], 3 * hidden)  # what three target layers would give
    chain, tree = drafts(made, target, fused, embeds)
    assert drafts(imported, target, fused, embeds) == drafts(again, target, fused, embeds) == (chain, tree)
    assert all(token % 3 == 0 for token in chain + tree[1:]), "drafts are target ids of the draft vocabulary"


def eagle3_requests(model, count: int = 3) -> list:
    from egpt_speed.decoding import DecodeRequest
    from egpt_speed.prompt import tokenize_with_event_placeholder

    generator = torch.Generator().manual_seed(11)
    requests = []
    for index, question in enumerate(["What is moving?", "Describe the scene in detail.", "Any cars?"][:count]):
        ids = tokenize_with_event_placeholder(model.template.render(question, model.tokenizer), model.tokenizer,
                                              model.fold_to_vocab)
        features = torch.randn(4 + index, model.hidden_size, generator=generator) * 0.5
        requests.append(DecodeRequest(f"s{index}", torch.tensor(ids), features, GenerationSettings(max_new_tokens=12)))
    return requests


@pytest.mark.parametrize("name", ["speculative", "eagle-tree"])
def test_an_eagle3_head_drafts_in_the_speculative_strategies_losslessly(target, tmp_path, name):
    """The strategy asks its target for the head's three layers (DynamicTarget.capture_layers): greedy fp32
    output equals the target's own, and the head's drafts get accepted at all."""
    from egpt_speed.hf_generate import generate_baseline
    from egpt_speed.strategies import registry
    from egpt_speed.strategies.registry import RunContext
    from egpt_speed.timing import Clock

    eagle3_public(target, tmp_path / "h", aux=(0, 1, 1))  # the tiny target has layers 0..1
    strategy = registry.build(name, RunContext(device=CPU, dtype=torch.float32, draft_spec=str(tmp_path / "h")))
    strategy.prepare(target)
    assert isinstance(strategy.draft.head, ef.Eagle3Head)
    for request in eagle3_requests(target):
        clock, reference_clock = Clock(CPU), Clock(CPU)
        clock.begin(), reference_clock.begin()
        result = strategy.decode(target, request, clock)
        assert result.token_ids == generate_baseline(target, request, reference_clock).token_ids
        assert result.metrics["draft_forwards"] > 0


@pytest.mark.parametrize("static,eager", [("compile+eagle", "speculative"), ("compile+eagle-tree", "eagle-tree")])
def test_an_eagle3_head_drafts_on_the_compiled_target_as_on_the_eager_one(target, tmp_path, static, eager):
    """compile+ lends its static target, which passes the head's three layers (StaticTarget.capture_layers),
    and its captured drafter: greedy fp32 output equals the target's own, and every sample accepts exactly
    what the eager head on the dynamic target accepts (draft-for-draft equality: test_static_draft)."""
    from egpt_speed.hf_generate import generate_baseline
    from egpt_speed.strategies import registry
    from egpt_speed.strategies.registry import RunContext
    from egpt_speed.timing import Clock

    eagle3_public(target, tmp_path / "h", aux=(0, 1, 1))  # the tiny target has layers 0..1
    built = {}
    for name in (static, eager):
        built[name] = registry.build(name, RunContext(device=CPU, dtype=torch.float32, draft_spec=str(tmp_path / "h"),
                                                      options={"tree_nodes": 10}))
        built[name].prepare(target)
    for request in eagle3_requests(target):
        results = {}
        for name in (static, eager, "reference"):
            clock = Clock(CPU)
            clock.begin()
            results[name] = (generate_baseline(target, request, clock) if name == "reference"
                             else built[name].decode(target, request, clock))
        assert results[static].token_ids == results[eager].token_ids == results["reference"].token_ids
        assert results[static].metrics["drafter"] == "StaticEagleDrafter"
        assert results[static].metrics["accepted"] == results[eager].metrics["accepted"]
        assert results[static].metrics["draft_forwards"] > 0


def test_a_head_for_another_target_is_refused(target, tmp_path):
    eagle3_public(target, tmp_path / "h")
    with pytest.raises(EgptError, match="width 64 and .* this target has width 4096"):
        ef.load_public_head(tmp_path / "h", 4096, target.llm.config.vocab_size, CPU, torch.float32)


def test_a_shipped_eagle3_head_is_the_default_draft_of_tiny(target, tmp_path, monkeypatch):
    """tiny-eagle may be shipped in our layout or in the public EAGLE-3 one: either is tiny's default draft."""
    from egpt_speed import drafts

    monkeypatch.setattr(drafts, "shipped_head_dir", lambda name: tmp_path / name)
    assert drafts.default_draft_for("tiny") == "tiny-truncated"  # nothing shipped
    eagle3_public(target, tmp_path / "tiny-eagle", aux=(0, 1, 1))
    assert drafts.default_draft_for("tiny") == "tiny-eagle"
    draft = load_draft(None, target, "tiny", CPU, torch.float32)
    assert isinstance(draft.head, ef.Eagle3Head) and draft.name == "tiny-eagle"


def test_the_shipped_eagle3_head_exports_in_its_own_layout_by_default(tmp_path):
    from egpt_speed.drafts import shipped_head_dir

    head = shipped_head_dir("tiny-eagle")
    result = CliRunner().invoke(app, ["export-draft", str(head), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert ef.detect_format(tmp_path / "o") == ef.EAGLE3
    result = CliRunner().invoke(app, ["export-draft", str(head), "--format", "eagle", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "EAGLE-3 head" in result.stderr and "Traceback" not in result.output
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(app, ["export-draft", str(head), "--out", str(tmp_path / "file")])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: --out {tmp_path / 'file'} is a file, not a directory; pass a directory."
