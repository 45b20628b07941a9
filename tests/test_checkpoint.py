"""The EventGPT checkpoint loader against an independent hand-written reference, and its error messages."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from typer.testing import CliRunner

from egpt_speed.baselines.runner import RunConfig, execute
from egpt_speed.cli import app
from egpt_speed.datasets import discover_samples
from egpt_speed.errors import EgptError
from egpt_speed.checkpoint import load_eventgpt_checkpoint
from egpt_speed.models import check_model_spec
from egpt_speed.prompt import tokenize_with_event_placeholder
from egpt_speed.stages import stage1_load, stage2_preprocess, stage3_vision
from egpt_speed.vision_tower import KNOWN_CLIP_TOWERS, embedded_tower_config
from helpers import TINY_TOWER_CONFIG, TOWER_NAME, make_tiny_eventgpt, write_eventgpt_checkpoint

CPU = torch.device("cpu")
VICUNA = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# ---------------------------------------------------------------------------------------------- reference


def reference_frames(npy: Path, n: int) -> list[np.ndarray]:
    """EventGPT's renderer as its per-event loop: n equal-count chunks, white, p=1 red, p=0 blue, last event wins."""
    clip = np.load(npy, allow_pickle=True).item()
    x, y, p = clip["x"].astype(int), clip["y"].astype(int), clip["p"].astype(int)
    per = len(x) // n
    frames = []
    for k in range(n):
        a, b = k * per, (len(x) if k == n - 1 else (k + 1) * per)
        image = np.full((y[a:b].max() + 1, x[a:b].max() + 1, 3), 255, dtype=np.uint8)
        for i in range(a, b):
            image[y[i], x[i]] = (255, 0, 0) if p[i] else (0, 0, 255)
        frames.append(image)
    return frames


def reference_prompt_ids(sp: sentencepiece.SentencePieceProcessor, query: str) -> list[int]:
    prompt = f"{VICUNA} USER: <ev_start><event><ev_end>\n{query} ASSISTANT:"
    before, after = prompt.split("<event>")
    return [1] + sp.encode(before) + [-200] + sp.encode(after)  # one BOS, the placeholder between chunks


@torch.no_grad()
def reference_event_features(model, npy: Path, frames: int) -> torch.Tensor:
    """CLIP last_hidden_state → projector → adaptor once per frame → T temporal means, then P spatial means."""
    pixels = model.image_processor(images=reference_frames(npy, frames), return_tensors="pt")["pixel_values"]
    features = model.adaptor(model.projector(model.vision_tower(pixels).last_hidden_state))  # [T, P, H]
    t, p = features.shape[:2]
    temporal = torch.stack([features[i].mean(dim=0) for i in range(t)])
    spatial = torch.stack([features[:, j].mean(dim=0) for j in range(p)])
    return torch.cat([temporal, spatial])  # [T + P, H]


@torch.no_grad()
def reference_generate(model, sp, npy: Path, query: str, frames: int, max_new_tokens: int) -> list[int]:
    """Prompt by hand, the reference event features spliced at −200, an uncached greedy loop over the full sequence."""
    event = reference_event_features(model, npy, frames)
    ids = reference_prompt_ids(sp, query)
    at = ids.index(-200)
    embed = model.llm.get_input_embeddings()
    sequence = torch.cat([embed(torch.tensor(ids[:at])), event, embed(torch.tensor(ids[at + 1:]))])
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.llm(inputs_embeds=sequence[None], use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token == 2:
            break
        sequence = torch.cat([sequence, embed(torch.tensor([token]))])
    return out


# ---------------------------------------------------------------------------------------------- loading


VARIANTS = {
    # name: (tower in checkpoint, CLIP dir beside it, sharded weights)
    "tower-in-checkpoint-named-known-clip": (True, False, False),
    "tower-in-checkpoint-sharded-with-dir": (True, True, True),
    "separate-tower-dir": (False, True, False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_pipeline_equals_hand_written_reference(variant, tmp_path, tiny_dataset, sp_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray ./checkpoints/ may satisfy the tower lookup
    # Without a CLIP dir the tower's config comes from the table of known towers: make the test tower one of them.
    monkeypatch.setitem(KNOWN_CLIP_TOWERS, TOWER_NAME, TINY_TOWER_CONFIG)
    in_checkpoint, with_dir, sharded = VARIANTS[variant]
    original = make_tiny_eventgpt(3, hidden=96, layers=3, tokenizer=sp_tokenizer)
    checkpoint = write_eventgpt_checkpoint(tmp_path / "EventGPT-tiny", tower_in_checkpoint=in_checkpoint,
                                           sharded=sharded, tower_dir=with_dir, model=original)
    assert (checkpoint / "model.safetensors.index.json").exists() == sharded
    assert (tmp_path / TOWER_NAME).exists() == with_dir

    loaded = load_eventgpt_checkpoint(checkpoint, torch.float32, CPU)
    assert loaded.hidden_size == 96 and loaded.llm.config.num_hidden_layers == 3
    assert loaded.llm.config.vocab_size == len(sp_tokenizer) == 400
    assert loaded.projector[0].in_features == original.vision_tower.config.hidden_size
    assert loaded.vision_tower.config.num_attention_heads == original.vision_tower.config.num_attention_heads
    assert loaded.adaptor is not None and loaded.adaptor.in_features == 96
    assert (loaded.tokenizer.bos_token_id, loaded.tokenizer.eos_token_id) == (1, 2)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    max_new = 12
    document, path = execute(RunConfig(strategies=["baseline"], model=str(checkpoint), data=str(tiny_dataset), samples=2,
                                       warmup=1, max_new_tokens=max_new, dtype="float32", device="cpu"), tmp_path / "out")
    assert path.exists()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    specs = {s.id: s for s in discover_samples(tiny_dataset)}
    samples = document["runs"]["baseline"]["samples"]
    assert len(samples) == 2
    for sample in samples:
        spec = specs[sample["id"]]
        encoded = stage3_vision(stage2_preprocess(stage1_load(spec, "npy", 5), loaded, 5), loaded)
        torch.testing.assert_close(encoded.event_features, reference_event_features(original, spec.event_path, 5))
        assert encoded.prompt_ids.tolist() == reference_prompt_ids(sp, spec.query)
        expected = reference_generate(original, sp, spec.event_path, spec.query, 5, max_new)
        assert sample["token_ids"] == expected
        assert sample["event_tokens"] == 5 + original.vision_tower.config.image_size ** 2 // 14 ** 2 + 1
        assert sample["prompt_tokens"] == len(reference_prompt_ids(sp, spec.query)) - 1 + sample["event_tokens"]


def test_one_frame_path_equals_reference(tmp_path, tiny_dataset, sp_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = make_tiny_eventgpt(5, tokenizer=sp_tokenizer)
    checkpoint = write_eventgpt_checkpoint(tmp_path / "ck", tower_in_checkpoint=False, model=original)
    document, _ = execute(RunConfig(strategies=["baseline"], model=str(checkpoint), data=str(tiny_dataset), samples=1,
                                    warmup=0, max_new_tokens=8, frames=1, device="cpu"), tmp_path / "out")
    sample = document["runs"]["baseline"]["samples"][0]
    spec = {s.id: s for s in discover_samples(tiny_dataset)}[sample["id"]]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    assert sample["token_ids"] == reference_generate(original, sp, spec.event_path, spec.query, 1, 8)
    assert sample["event_tokens"] == 1 + 5 and document["config"]["frames"] == 1


def test_tokenizer_from_bare_sentencepiece_model_matches_sentencepiece(tmp_path, sp_tokenizer):
    checkpoint = write_eventgpt_checkpoint(tmp_path / "ck", model=make_tiny_eventgpt(0, tokenizer=sp_tokenizer))
    assert not (checkpoint / "tokenizer.json").exists()  # as Vicuna/EventGPT ship it
    tokenizer = load_eventgpt_checkpoint(checkpoint, torch.float32, CPU).tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    for text in (VICUNA + " USER: <ev_start>", "<ev_end>\nWhat is this scene about? ASSISTANT:", "Ωmega 42 cars"):
        assert tokenizer(text).input_ids == [1] + sp.encode(text)
    assert tokenizer.decode([1] + sp.encode("a car on the road"), skip_special_tokens=True) == "a car on the road"
    assert tokenizer.pad_token_id == 0  # special_tokens_map: pad = <unk>, as LLaVA sets it


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def good_checkpoint(tmp_path, sp_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_eventgpt_checkpoint(tmp_path / "ck", tower_in_checkpoint=False,
                                     model=make_tiny_eventgpt(0, tokenizer=sp_tokenizer))


def _edit_config(checkpoint: Path, **changes) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(changes)
    (checkpoint / "config.json").write_text(json.dumps(config))


def _truncate_weights(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _drop_layer(checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.1.")}, str(checkpoint / "model.safetensors"))


BROKEN = {
    # name: (how to break a good checkpoint → the model path to pass, what the message must say)
    "missing-dir": (lambda ck: ck.parent / "nowhere", "does not exist"),
    "empty-dir": (lambda ck: (shutil.rmtree(ck), ck.mkdir(), ck)[-1], "no config.json"),
    "unknown-model-type": (lambda ck: (_edit_config(ck, model_type="llava_llama"), ck)[-1], "EventChat_llama"),
    "event-qformer": (lambda ck: (_edit_config(ck, use_event_qformer=True), ck)[-1], "use_event_qformer"),
    "truncated-weights": (lambda ck: (_truncate_weights(ck), ck)[-1], "truncated or corrupt"),
    "missing-layer": (lambda ck: (_drop_layer(ck), ck)[-1], "model.layers.1."),
    "missing-tower-dir": (lambda ck: (shutil.rmtree(ck.parent / TOWER_NAME), ck)[-1], "--vision-tower"),
    "config-a-list": (lambda ck: ((ck / "config.json").write_text("[]"), ck)[-1], "holds a JSON list, not an object"),
    "config-not-utf8": (lambda ck: ((ck / "config.json").write_bytes(b'{"\xff": 1}'), ck)[-1], "is not readable JSON"),
    "weights-a-fifo": (lambda ck: ((ck / "model.safetensors").unlink(), os.mkfifo(ck / "model.safetensors"), ck)[-1],
                       "is not a regular file"),
    "index-escapes": (lambda ck: ((ck / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../model.safetensors"}})), ck)[-1], "names weight files outside"),
    "index-a-list": (lambda ck: ((ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []})), ck)[-1],
                     "is not a valid safetensors index"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_raises_a_clear_error(case, good_checkpoint):
    breaker, message = BROKEN[case]
    path = breaker(good_checkpoint)
    with pytest.raises(EgptError, match=message.replace(".", r"\.")) as raised:
        load_eventgpt_checkpoint(path, torch.float32, CPU)
    assert str(path) in str(raised.value) or case == "missing-tower-dir"
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_through_cli_is_one_line_exit_nonzero(case, good_checkpoint, tiny_dataset, tmp_path):
    breaker, message = BROKEN[case]
    path = breaker(good_checkpoint)
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["run", "baseline", "--model", str(path), "--data", str(tiny_dataset), "-n", "1",
                                      "--warmup", "0", "--max-new-tokens", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not list(out.glob("*.json")) if out.exists() else True


def test_vision_tower_override(good_checkpoint, tmp_path, sp_tokenizer):
    elsewhere = tmp_path / "towers" / "my-clip"
    elsewhere.parent.mkdir()
    (good_checkpoint.parent / TOWER_NAME).rename(elsewhere)
    with pytest.raises(EgptError, match="not found"):
        load_eventgpt_checkpoint(good_checkpoint, torch.float32, CPU)
    loaded = load_eventgpt_checkpoint(good_checkpoint, torch.float32, CPU, vision_tower=elsewhere)
    original = make_tiny_eventgpt(0, tokenizer=sp_tokenizer)
    for name, tensor in original.vision_tower.state_dict().items():
        assert torch.equal(loaded.vision_tower.state_dict()[name], tensor), name
    with pytest.raises(EgptError, match="not a CLIP model directory"):
        load_eventgpt_checkpoint(good_checkpoint, torch.float32, CPU, vision_tower=tmp_path / "towers")


def test_vision_tower_override_through_cli(good_checkpoint, tiny_dataset, tmp_path):
    elsewhere = tmp_path / "my-clip"
    (good_checkpoint.parent / TOWER_NAME).rename(elsewhere)
    out = tmp_path / "results"
    args = ["run", "baseline", "--model", str(good_checkpoint), "--data", str(tiny_dataset), "-n", "1", "--warmup", "0",
            "--max-new-tokens", "2", "--device", "cpu", "--out", str(out)]
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code != 0 and "--vision-tower" in missing.stderr
    result = CliRunner().invoke(app, args + ["--vision-tower", str(elsewhere)])
    assert result.exit_code == 0, result.output
    document = json.loads(next(out.glob("*.json")).read_text())
    assert document["config"]["vision_tower"] == str(elsewhere)


# ---------------------------------------------------------------------------------------------- vision tower


def _meta_clip_weights(config: dict) -> dict[str, torch.Tensor]:
    """A CLIP vision state dict of the given config with no storage (keys as transformers 5 names them)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        return CLIPVisionModel(CLIPVisionConfig(**config)).state_dict()


def test_embedded_tower_named_like_openai_clip_gets_its_published_config():
    weights = _meta_clip_weights(KNOWN_CLIP_TOWERS["clip-vit-large-patch14-336"])
    config = embedded_tower_config("openai/clip-vit-large-patch14-336", weights, None)
    assert (config.num_attention_heads, config.num_hidden_layers, config.hidden_size) == (16, 24, 1024)
    assert (config.intermediate_size, config.patch_size, config.image_size, config.projection_dim) == (4096, 14, 336, 768)


def test_embedded_tower_that_contradicts_its_name_is_refused():
    weights = _meta_clip_weights(KNOWN_CLIP_TOWERS["clip-vit-base-patch16"])
    with pytest.raises(EgptError, match="not clip-vit-large-patch14-336: hidden_size 768") as raised:
        embedded_tower_config("clip-vit-large-patch14-336", weights, None)
    assert "--vision-tower" in str(raised.value)


def test_embedded_tower_of_unknown_name_without_config_is_refused_not_guessed(tmp_path, sp_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = write_eventgpt_checkpoint(tmp_path / "ck", tower_dir=False, model=make_tiny_eventgpt(0, tokenizer=sp_tokenizer))
    with pytest.raises(EgptError, match="attention-head count is not in the weights") as raised:
        load_eventgpt_checkpoint(checkpoint, torch.float32, CPU)
    assert TOWER_NAME in str(raised.value) and "--vision-tower" in str(raised.value)


@pytest.mark.parametrize("tower_in_checkpoint", [True, False])
def test_vision_tower_override_that_does_not_exist_is_an_error(tower_in_checkpoint, tmp_path, sp_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = write_eventgpt_checkpoint(tmp_path / "ck", tower_in_checkpoint=tower_in_checkpoint,
                                           model=make_tiny_eventgpt(0, tokenizer=sp_tokenizer))
    nowhere = tmp_path / "no-such-clip"
    with pytest.raises(EgptError, match="does not exist"):
        check_model_spec(str(checkpoint), nowhere)
    with pytest.raises(EgptError, match=f"--vision-tower {nowhere} does not exist"):
        load_eventgpt_checkpoint(checkpoint, torch.float32, CPU, vision_tower=nowhere)


# ---------------------------------------------------------------------------------------------- tokenizer guard


@pytest.fixture(scope="module")
def nfkc_checkpoint(tmp_path_factory):
    """A checkpoint whose sentencepiece model normalises with nmt_nfkc ("\\n" → "▁"), which transformers ignores."""
    root = tmp_path_factory.mktemp("nfkc")
    return write_eventgpt_checkpoint(root / "ck", normalization="nmt_nfkc")


def test_tokenizer_that_ignores_the_sentencepiece_normaliser_is_refused(nfkc_checkpoint):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(nfkc_checkpoint / "tokenizer.model"))
    assert sp.encode("<ev_end>\nWhat") == sp.encode("<ev_end> What")  # the normaliser at work
    with pytest.raises(EgptError, match="--allow-tokenizer-mismatch") as raised:
        load_eventgpt_checkpoint(nfkc_checkpoint, torch.float32, CPU)
    message = str(raised.value)
    assert "\n" not in message and "tokenizer gives ids [" in message and "sentencepiece gives [" in message


def test_allowed_tokenizer_mismatch_is_recorded_with_the_differing_ids(nfkc_checkpoint):
    loaded = load_eventgpt_checkpoint(nfkc_checkpoint, torch.float32, CPU, allow_tokenizer_mismatch=True)
    mismatch = loaded.tokenizer_mismatch
    assert mismatch is not None and mismatch.tokenizer_ids[0] != mismatch.sentencepiece_ids[0]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(nfkc_checkpoint / "tokenizer.model"))
    reference = reference_prompt_ids(sp, mismatch.query)
    assert reference[mismatch.position:mismatch.position + len(mismatch.sentencepiece_ids)] == mismatch.sentencepiece_ids
    prompt = f"{VICUNA} USER: <ev_start><event><ev_end>\n{mismatch.query} ASSISTANT:"
    ours = tokenize_with_event_placeholder(prompt, loaded.tokenizer)
    assert ours[:mismatch.position] == reference[:mismatch.position] and ours[mismatch.position] != reference[mismatch.position]
    assert ours[mismatch.position:mismatch.position + len(mismatch.tokenizer_ids)] == mismatch.tokenizer_ids


def test_identity_normaliser_checkpoint_passes_the_guard(tmp_path, sp_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = write_eventgpt_checkpoint(tmp_path / "ck", model=make_tiny_eventgpt(0, tokenizer=sp_tokenizer))
    assert load_eventgpt_checkpoint(checkpoint, torch.float32, CPU).tokenizer_mismatch is None
