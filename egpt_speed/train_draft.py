"""`egpt-speed train-draft`: fit an EAGLE head to a target on its own answers to event clips.

1. collect — for (clip, question) pairs, run Stages 1–3 once per clip and the target's greedy answers
   for a batch of prompts in one `generate` (answers journaled as token ids).
2. train — the head maps (f_t, e_{t+1}) → f_{t+1}; loss = SmoothL1 on features + 0.1 × CE of the
   target's LM head on the prediction against the target's next token (EAGLE's recipe), on the
   answer positions plus the last `--prompt-window` prompt positions (the head still reads the whole
   prefix, as it does when drafting). Online (default): each training batch's features come from one
   teacher-forced target forward over [prefix, answer], nothing stored; `--store-features`: that
   forward runs once at collection and every sequence's features are kept (and saved) for training.
3. report — teacher-forced top-1 agreement with the target on held-out clips *and* questions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from egpt_speed import shards
from egpt_speed.datasets import SampleSpec, resolve_samples
from egpt_speed.decoding import DecodeRequest, GenerationSettings
from egpt_speed.eagle import EagleHead, draft_vocabulary, head_config_from_target
from egpt_speed.eagle_formats import Eagle3Head, default_aux_layers, export_eagle3
from egpt_speed.errors import EgptError
from egpt_speed.models import cache_root, load_model
from egpt_speed.options import TrainDraftOptions
from egpt_speed.speculation import capture_layer_inputs
from egpt_speed.stages import EncodedSample, make_request, prompt_ids_for, stage1_load, stage2_preprocess, stage3_vision
from egpt_speed.timing import Clock
from egpt_speed.tree import additive_mask
from egpt_speed.hf_generate import generate_batch

# train-draft's synthetic clips come from seed + this, so a head trained with --seed S never saw the
# clips `run`/`compare --seed S` benchmark on (a clip's events derive from (seed, index) only).
TRAIN_SEED_OFFSET = 7919
TARGET_QUANTS = ("none", "nf4")
HEAD_STYLES = ("eagle", "eagle3")  # --head-style: EAGLE-1/2's head on the last layer, or EAGLE-3's on three
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TrainDraftConfig = TrainDraftOptions  # the CLI's options are the run's configuration

Progress = Callable[[int], None]
AnswerSink = Callable[[int, list[list[int]]], None]  # (index of the first pair, its batch's answers)


@dataclass
class TrainingSequence:
    features: torch.Tensor  # [1, T, H] target post-norm features for positions 0..T-1 (CPU)
    input_embeds: torch.Tensor  # [1, T + 1, H] inputs at positions 0..T (prefix rows, then answer tokens)
    labels: torch.Tensor  # [T] the target's greedy token after position t (argmax of its LM head)
    prefix_len: int
    answer: list[int]  # the target's greedy answer, EOS included when generated


@dataclass
class ClipRecord:
    """Which clips a head was trained and judged on, so a benchmark can be checked for leakage."""

    data: str  # --data as given
    synthetic_seed: int | None  # seed the synthetic clips were drawn from; None for a dataset dir
    train_clips: list[str]  # clip ids
    heldout_clips: list[str]


@dataclass
class TrainReport:
    train_sequences: int
    heldout_sequences: int
    epochs: int
    final_loss: float
    train_top1: float
    heldout_top1: float
    collect_s: float
    train_s: float
    clips: ClipRecord
    draft_vocab: int = 0  # ids the head may draft (0 = all)
    heldout_vocab_coverage: float = 1.0  # share of held-out answer tokens inside that vocabulary
    online: bool = False  # features computed per training batch (True) or stored at collection
    prompt_window: int = 0  # prompt positions before the answer in the loss
    head_style: str = "eagle"
    unroll: int = 1  # training steps on the head's own predictions (EAGLE-3's training-time test)


def synthetic_seed(seed: int) -> int:
    return seed + TRAIN_SEED_OFFSET


def store_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """--store-dtype: bfloat16 halves the memory of thousands of sequences; training upcasts to float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in STORE_DTYPES:
        raise EgptError(f"--store-dtype {name!r} is not supported; use auto, float32 or bfloat16.")
    return STORE_DTYPES[name]


def training_clips(data: str, clips: int, seed: int, synthetic_events: int,
                   allow_outside: bool = False) -> tuple[list[SampleSpec], int | None]:
    """(the first `clips` clips of --data, the seed synthetic ones were drawn from or None).

    `allow_outside`: --allow-paths-outside-data (dataset JSON paths may leave the dataset dir).
    """
    drawn_from = synthetic_seed(seed) if data == "synthetic" else None
    specs = resolve_samples(data, clips, 0, synthetic_seed(seed), synthetic_events, cache_root() / "synthetic",
                            allow_outside=allow_outside)
    return specs[:clips], drawn_from


def pairs_for(specs: list[SampleSpec], questions: list[str], count: int, holdout_fraction: float,
              seed: int) -> tuple[list[tuple[SampleSpec, str]], list[tuple[SampleSpec, str]]]:
    """Disjoint train / held-out (clip, question) pairs: held-out clips AND questions are unseen."""
    if len(specs) < 2 or len(questions) < 2:
        raise EgptError("train-draft needs at least 2 clips and 2 questions to hold some out.")
    held_clips = max(1, int(len(specs) * holdout_fraction))
    held_questions = max(1, int(len(questions) * holdout_fraction))
    train_specs, heldout_specs = specs[:-held_clips], specs[-held_clips:]
    train_q, heldout_q = questions[:-held_questions], questions[-held_questions:]
    rng = random.Random(seed)
    train = [(train_specs[i % len(train_specs)], rng.choice(train_q)) for i in range(count)]
    heldout_count = max(2, int(count * holdout_fraction))
    heldout = [(heldout_specs[i % len(heldout_specs)], rng.choice(heldout_q)) for i in range(heldout_count)]
    return train, heldout


def clip_record(data: str, seed: int | None, train: list[tuple[SampleSpec, str]],
                heldout: list[tuple[SampleSpec, str]]) -> ClipRecord:
    return ClipRecord(data, seed, sorted({spec.id for spec, _ in train}), sorted({spec.id for spec, _ in heldout}))


# ------------------------------------------------------------------------------------------ collect


@torch.no_grad()  # not inference_mode: the stored tensors feed autograd during training
def collect_sequence(model, spec: SampleSpec, question: str, settings: GenerationSettings, frames: int,
                     decode, store_dtype: torch.dtype = torch.float32) -> TrainingSequence:
    """One pair through Stages 1–3 and `decode` (batch 1): the reference `collect_batch` must match."""
    request = make_request(EncodedSample(spec, clip_features(model, spec, frames), prompt_ids_for(model, question)), settings)
    clock = Clock(model.device, enabled=False)
    clock.begin()
    answer = decode(model, request, clock).token_ids
    return teacher_forced(model, [request], [answer], store_dtype)[0]


@dataclass
class AnswerItem:
    """One collected pair for online training: the target's request (prompt ids, clip features on the
    device, shared by every pair of that clip) and its greedy answer."""

    request: DecodeRequest
    answer: list[int]


@torch.no_grad()
def collect_batch(model, pairs: list[tuple[SampleSpec, str]], settings: GenerationSettings, frames: int,
                  batch_size: int, store_dtype: torch.dtype = torch.float32, progress: Progress | None = None,
                  known: list[list[int]] | None = None, on_answers: AnswerSink | None = None) -> list[TrainingSequence]:
    """Stored training sequences for `pairs` (`collect_answers`, then one teacher-forced forward per batch)."""
    items = collect_answers(model, pairs, settings, frames, batch_size, progress, known, on_answers)
    sequences: list[TrainingSequence] = []
    for chunk in chunks(items, batch_size):
        sequences += teacher_forced(model, [item.request for item in chunk], [item.answer for item in chunk], store_dtype)
    return sequences


@torch.no_grad()
def collect_answers(model, pairs: list[tuple[SampleSpec, str]], settings: GenerationSettings, frames: int,
                    batch_size: int, progress: Progress | None = None, known: list[list[int]] | None = None,
                    on_answers: AnswerSink | None = None) -> list[AnswerItem]:
    """The target's answers to `pairs`, in order: Stage 3 once per clip, `batch_size` answers per `generate`.

    `known` answers (journaled by an interrupted run) are not generated again, only teacher-forced;
    `on_answers(first, answers)` receives each batch's new answers before the next batch starts.
    Left-padded batched greedy answers can differ from batch-1 ones at rare near-ties (padding changes
    reduction order); that is fine for training data, whose labels are the target's own
    teacher-forced argmax over whatever answer it gave.
    """
    if batch_size < 1:
        raise EgptError("--batch-size must be at least 1.")
    known = known or []
    event_features: dict[Path | None, torch.Tensor] = {}  # Stage 3 depends only on the clip (and frames)
    clock = Clock(model.device, enabled=False)
    items: list[AnswerItem] = []
    for first in range(0, len(pairs), batch_size):
        requests = []
        for spec, question in pairs[first:first + batch_size]:
            if spec.event_path not in event_features:
                event_features[spec.event_path] = clip_features(model, spec, frames)
            encoded = EncodedSample(spec, event_features[spec.event_path], prompt_ids_for(model, question))
            requests.append(make_request(encoded, settings))
        answers = known[first:first + len(requests)]
        if len(answers) < len(requests):
            clock.begin()
            new = [r.token_ids for r in generate_batch(model, requests[len(answers):], clock)]  # cut after EOS
            if on_answers:
                on_answers(first + len(answers), new)
            answers = answers + new
        items += [AnswerItem(request, answer) for request, answer in zip(requests, answers)]
        if progress:
            progress(len(requests))
    return items


def clip_features(model, spec: SampleSpec, frames: int) -> torch.Tensor:
    """Stages 1–3 of one clip: its event features [N_ev, H] on the device."""
    encoded = stage3_vision(stage2_preprocess(stage1_load(spec, "npy", frames), model, frames), model)
    return encoded.event_features.clone()  # out of inference mode


def teacher_forced(model, requests: list[DecodeRequest], answers: list[list[int]],
                   store_dtype: torch.dtype) -> list[TrainingSequence]:
    """One target forward over the right-padded [prefix, answer] rows → a sequence per row.

    Causal attention already keeps real positions blind to right padding; the mask says so too.
    """
    embed = model.llm.get_input_embeddings()
    prefixes = [model.splice(r.prompt_ids, r.event_features)[0] for r in requests]  # B × [L_i, H]
    rows = [torch.cat([prefix, embed(torch.tensor(answer, device=prefix.device)).to(prefix.dtype)])
            for prefix, answer in zip(prefixes, answers)]  # B × [L_i + n_i, H]
    lengths = torch.tensor([row.shape[0] - 1 for row in rows], device=prefixes[0].device)
    inputs = pad_sequence([row[:-1] for row in rows], batch_first=True)  # [B, T_max, H]
    attention = (torch.arange(inputs.shape[1], device=inputs.device) < lengths[:, None]).long()
    features = model.llm.model(inputs_embeds=inputs, attention_mask=attention, use_cache=False).last_hidden_state
    sequences = []
    for index, (prefix, row, answer) in enumerate(zip(prefixes, rows, answers)):
        own = features[index, :row.shape[0] - 1]  # [T, H]
        labels = model.llm.lm_head(own).argmax(-1)  # real positions only: the vocab projection is the big one
        sequences.append(TrainingSequence(_stored(own[None], store_dtype), _stored(row[None], store_dtype),
                                          labels.cpu(), prefix.shape[0], answer))
    return sequences


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device="cpu", dtype=dtype, copy=True)  # a copy: a view would pin the whole padded batch


# ------------------------------------------------------------------------------------------ train


@dataclass
class SequenceBatch:
    """Sequences right-padded to one T on the device, float32."""

    features: torch.Tensor  # [B, T, H]
    inputs: torch.Tensor  # [B, T + 1, H]
    labels: torch.Tensor  # [B, T] (only positions from `starts` on are read)
    lengths: torch.Tensor  # [B] each sequence's own T
    starts: torch.Tensor  # [B] first prediction in the loss: the prompt window's first row
    scored: torch.Tensor  # [B] first prediction in top-1: the last prefix rows on, what drafting uses


def first_predictions(prefix_lens: list[int], window: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss starts, top-1 starts) [B]: column prefix_len − 2 predicts the feature whose argmax is the answer's first token."""
    scored = torch.tensor([max(n - 2, 0) for n in prefix_lens], device=device)
    return (scored - window).clamp(min=0), scored


def make_batch(sequences: list[TrainingSequence], device: torch.device, window: int = 0) -> SequenceBatch:
    def padded(tensors: list[torch.Tensor]) -> torch.Tensor:
        return pad_sequence(tensors, batch_first=True).to(device)

    return SequenceBatch(padded([s.features[0] for s in sequences]).float(),
                         padded([s.input_embeds[0] for s in sequences]).float(),
                         padded([s.labels for s in sequences]),
                         torch.tensor([s.features.shape[1] for s in sequences], device=device),
                         *first_predictions([s.prefix_len for s in sequences], window, device))


@torch.no_grad()
def online_batch(model, items: list[AnswerItem], window: int, aux_layers: list[int] | None = None) -> SequenceBatch:
    """A training batch computed now: one teacher-forced target forward over the right-padded
    [prefix, answer] rows (as `teacher_forced`), labels only where the loss reads them.

    aux_layers (EAGLE-3): the features are those layers' inputs concatenated, [B, T, 3H]."""
    embed = model.llm.get_input_embeddings()
    prefixes = [model.splice(i.request.prompt_ids, i.request.event_features)[0] for i in items]  # B × [L_i, H]
    rows = [torch.cat([prefix, embed(torch.tensor(i.answer, device=prefix.device)).to(prefix.dtype)])
            for prefix, i in zip(prefixes, items)]  # B × [L_i + n_i, H]
    device = prefixes[0].device
    lengths = torch.tensor([row.shape[0] - 1 for row in rows], device=device)
    inputs = pad_sequence([row[:-1] for row in rows], batch_first=True)  # [B, T, H]
    index = torch.arange(inputs.shape[1], device=device)
    attention = (index < lengths[:, None]).long()
    with capture_layer_inputs(model.llm.model.layers, aux_layers or []) as captured:
        hidden = model.llm.model(inputs_embeds=inputs, attention_mask=attention, use_cache=False).last_hidden_state
    starts, scored = first_predictions([prefix.shape[0] for prefix in prefixes], window, device)
    needed = (index >= starts[:, None]) & (index < lengths[:, None])  # [B, T]
    labels = torch.zeros(needed.shape, dtype=torch.long, device=device)
    labels[needed] = model.llm.lm_head(hidden[needed]).argmax(-1)  # the vocab projection only where read
    if aux_layers:
        hidden = torch.cat([captured[index] for index in aux_layers], dim=-1)
    features = hidden.float() * attention[..., None]  # zero padding rows, as the stored path pads
    return SequenceBatch(features, pad_sequence(rows, batch_first=True).float(), labels, lengths, starts, scored)


class StoredSet:
    """Training data whose features were stored at collection (`--store-features`)."""

    def __init__(self, sequences: list[TrainingSequence], window: int = 0):
        self.sequences, self.window = sequences, window

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, indices: list[int], device: torch.device) -> SequenceBatch:
        return make_batch([self.sequences[i] for i in indices], device, self.window)

    def answers(self) -> list[torch.Tensor]:
        return [answer_labels(s) for s in self.sequences]


class OnlineSet:
    """Training data as answers only: each batch's features come from the target when it is drawn."""

    def __init__(self, model, items: list[AnswerItem], window: int, aux_layers: list[int] | None = None):
        self.model, self.items, self.window = model, items, window
        self.aux_layers = aux_layers  # EAGLE-3 heads: the target layers whose inputs are the features

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: list[int], device: torch.device) -> SequenceBatch:
        return online_batch(self.model, [self.items[i] for i in indices], self.window, self.aux_layers)

    def answers(self) -> list[torch.Tensor]:
        return [torch.tensor(item.answer, dtype=torch.long) for item in self.items]


TrainingData = StoredSet | OnlineSet


def as_training_data(data: "TrainingData | list[TrainingSequence]", window: int = 0) -> TrainingData:
    return StoredSet(data, window) if isinstance(data, list) else data


def head_loss(head: EagleHead, lm_head, batch: SequenceBatch, unroll: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, first-step top-1 hits on the counted positions of every sequence) of a padded batch.

    The loss is the mean over sequences of each sequence's own loss (position means), so a batch of one
    is one sequence's loss. Step 1 is teacher-forced on the target's features. Steps 2..`unroll` feed
    the head its own predictions and attend as chain drafting does at positions 2..γ: to the target's
    features before the column and to that column's own earlier drafts (training_time_test_mask; without
    it, acceptance collapses after the first draft position — "training-time test", as in EAGLE-3).
    """
    count, T = batch.labels.shape
    device = batch.features.device
    index = torch.arange(T, device=device)
    current = batch.features[:, :-1]
    total = torch.zeros((), device=device)
    first_hits = torch.zeros(0, dtype=torch.bool, device=device)
    cache = DynamicCache(config=head.config) if unroll > 1 else None  # every step's keys, for the later steps
    for step in range(1, unroll + 1):
        length = T - step  # predictions for positions step..T-1
        if length <= 0:
            break
        counted = (index[:length] >= batch.starts[:, None]) & (index[:length] < (batch.lengths - step)[:, None])
        if not counted.any():
            break
        positions = torch.arange(step - 1, step - 1 + length, device=device)
        mask = None if step == 1 else training_time_test_mask(T, length, step, current.dtype, device)
        predicted = head(current[:, :length], batch.inputs[:, step:step + length], positions, cache, mask)
        rows, columns = counted.nonzero(as_tuple=True)
        prediction = predicted[rows, columns]  # [N, H]: the LM head runs on counted positions only
        per_position, hits = head.position_loss(lm_head, prediction, batch.features[rows, columns + step],
                                                batch.labels[rows, columns + step])
        per_sequence = torch.zeros(count, device=device).index_add(0, rows, per_position) / counted.sum(1).clamp(min=1)
        total = total + per_sequence.sum() / step
        if step == 1:
            first_hits = hits[columns >= batch.scored[rows]]
        current = predicted
    return total / count, first_hits


def training_time_test_mask(T: int, length: int, step: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Step `step`'s additive mask [1, 1, length, Σ_k (T-k)] over every step's keys (EAGLE-3's training-time test).

    Column j of step s stands for drafting position j+s-1 after the target's features up to j: as in chain
    drafting, it sees step 1's keys (the target's features) at columns ≤ j, and the keys of steps 2..s at
    column j only (its own earlier drafts), never other columns' drafts. Hand-written: transformers'
    mask helpers build causal/sliding/chunked masks, not this block-diagonal one."""
    rows = torch.arange(length, device=device).unsqueeze(1)
    blocks = [torch.arange(T - 1, device=device).unsqueeze(0) <= rows]
    blocks += [torch.arange(T - k, device=device).unsqueeze(0) == rows for k in range(2, step + 1)]
    return additive_mask(torch.cat(blocks, dim=1), dtype, device)


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def auto_train_batch(sequences: int) -> int:
    """Sequences per optimizer step: batching saves time only once there are enough steps left to learn
    from (120 answers at batch 8 trained to held-out top-1 0.16 on the CPU, at batch 1 to 0.45)."""
    return max(1, min(16, sequences // 250))


def train_head(model, train: TrainingData | list[TrainingSequence], heldout: TrainingData | list[TrainingSequence],
               epochs: int, lr: float, seed: int, progress: Progress | None = None, unroll: int = 1,
               batch_size: int = 1, checkpoint: Path | None = None, resume: bool = False,
               input_norm: bool = True, draft_vocab: torch.Tensor | None = None) -> tuple[EagleHead, float, float, float]:
    """Head, last step's loss, train and held-out top-1; `batch_size` sequences per optimizer step.

    `train` / `heldout`: stored sequences (a list, or a StoredSet) or an OnlineSet (features per batch).
    `input_norm=False`: EAGLE-1's layer without an input norm (--eagle1-layout).
    `draft_vocab` [K] target ids: train an EAGLE-3 head (--head-style eagle3) over that vocabulary from the
    OnlineSets' aux layers (fused low/mid/high states, its own norm and LM head, cross-entropy only).

    With `checkpoint`, the head, optimizer, schedule and shuffling state are saved after every epoch;
    `resume` continues from that file, giving the weights an uninterrupted run would have.
    """
    if batch_size < 1:
        raise EgptError("--train-batch must be at least 1.")
    train, heldout = as_training_data(train), as_training_data(heldout)
    torch.manual_seed(seed)
    device = model.device
    head = (initial_eagle_head(model, input_norm) if draft_vocab is None
            else initial_eagle3_head(model, train.aux_layers, draft_vocab)).to(device=device, dtype=torch.float32)
    lm_head = copy.deepcopy(model.llm.lm_head).float()  # a frozen float32 copy: the target stays as loaded
    lm_head.requires_grad_(False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    last = float("nan")
    settings = dict(epochs=epochs, lr=lr, seed=seed, unroll=unroll, batch_size=batch_size, sequences=len(train),
                    input_norm=input_norm, data=type(train).__name__, window=train.window,
                    head_style="eagle" if draft_vocab is None else "eagle3")
    done = 0
    if resume and checkpoint is not None and checkpoint.exists():
        done, last = _restore(checkpoint, settings, head, optimizer, scheduler, rng)
        if progress:
            progress(done * len(train))
    for epoch in range(done, epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for indices in chunks(order, batch_size):
            loss, _ = head_loss(head, lm_head, train.batch(indices, device), unroll)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            last = float(loss.detach())
            if progress:
                progress(len(indices))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, settings, epoch + 1, last, head, optimizer, scheduler, rng)
    head.eval()
    return head, last, top1(head, lm_head, train, device, batch_size), top1(head, lm_head, heldout, device, batch_size)


def layer_weights(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's parameters by name as plain tensors, bitsandbytes 4-bit ones (--target-quant nf4)
    dequantized: a head starts from the target's last layer whatever its weight format."""
    weights = {}
    for name, parameter in layer.named_parameters():
        quant_state = getattr(parameter, "quant_state", None)
        if quant_state is not None:
            import bitsandbytes.functional as bnb_functional

            parameter = bnb_functional.dequantize_4bit(parameter.data, quant_state)
        weights[name] = parameter.detach()
    return weights


def initial_eagle_head(model, input_norm: bool) -> EagleHead:
    """Start from the target's last layer, fc passing the feature through: a far better init than random."""
    head = EagleHead(head_config_from_target(model.llm.config), input_norm)
    with torch.no_grad():
        own = head.layer.state_dict()
        head.layer.load_state_dict({k: v for k, v in layer_weights(model.llm.model.layers[-1]).items() if k in own})
        hidden = model.llm.config.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden].copy_(torch.eye(hidden))
        head.fc.bias.zero_()
    return head


def initial_eagle3_head(model, aux_layers: list[int], draft_vocab: torch.Tensor) -> Eagle3Head:
    """An EAGLE-3 head over `draft_vocab` [K] reading `aux_layers`, started like ours: fc passes the highest aux
    layer through, the layer is the target's last (q/k/v: its weights on the hidden half, the embedding half
    at PyTorch's default init), norm and LM head rows are the target's."""
    llm = model.llm
    hidden = llm.config.hidden_size
    head = Eagle3Head(head_config_from_target(llm.config), list(aux_layers), draft_vocab.numel(), hidden)
    last = {k: v.float() for k, v in layer_weights(llm.model.layers[-1]).items()}
    with torch.no_grad():
        for name, tensor in head.layer.state_dict().items():
            if name in last and last[name].shape == tensor.shape:
                tensor.copy_(last[name])
            elif name in last and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                tensor[:, hidden:].copy_(last[name])
        head.fc.weight.zero_()
        head.fc.weight[:, (len(aux_layers) - 1) * hidden:].copy_(torch.eye(hidden))
        head.norm.weight.copy_(llm.model.norm.weight.float())
        head.lm_head.weight.copy_(llm.lm_head.weight[draft_vocab.to(llm.lm_head.weight.device)].float())
        head.draft_vocab.copy_(draft_vocab)
    return head


def _save_checkpoint(path: Path, settings: dict, epochs_done: int, last: float, head: EagleHead, optimizer,
                     scheduler, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"settings": settings, "epochs_done": epochs_done, "last_loss": last, "head": head.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state()}, partial)
    partial.replace(path)


def _restore(path: Path, settings: dict, head: EagleHead, optimizer, scheduler, rng: random.Random) -> tuple[int, float]:
    saved = _load_plain(path, map_location=next(head.parameters()).device)
    changed = sorted(k for k in settings.keys() | saved["settings"].keys() if settings.get(k) != saved["settings"].get(k))
    if changed:
        raise EgptError(f"--resume: {path} was trained with other settings ({', '.join(changed)}); "
                        "delete it or rerun with the same ones.")
    head.load_state_dict(saved["head"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng.setstate(saved["rng"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["epochs_done"], saved["last_loss"]


@torch.no_grad()
def top1(head: EagleHead, lm_head, sequences: TrainingData | list[TrainingSequence], device: torch.device,
         batch_size: int = 1) -> float:
    """Share of answer positions where the teacher-forced head's token is the target's (all positions pooled)."""
    data = as_training_data(sequences)
    hits = total = 0
    for chunk in chunks(list(range(len(data))), batch_size):
        _, correct = head_loss(head, lm_head, data.batch(chunk, device))
        hits += int(correct.sum())
        total += correct.numel()
    return hits / total if total else 0.0


def save_collected(path: Path, collection: dict, train: list[TrainingSequence],
                   heldout: list[TrainingSequence]) -> None:
    """The sequences and the settings that made them, written atomically: --resume trusts a whole file only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"collection": collection, "train": [asdict(s) for s in train],
                "heldout": [asdict(s) for s in heldout]}, partial)
    partial.replace(path)


def load_collected(path: Path, collection: dict) -> tuple[list[TrainingSequence], list[TrainingSequence]]:
    saved = _load_plain(path)
    previous = saved.get("collection") if isinstance(saved, dict) else None
    if previous is None:
        raise EgptError(f"--resume: {path} was written by an older train-draft; rerun without --resume.")
    changed = sorted(k for k in collection.keys() | previous.keys() if collection.get(k) != previous.get(k))
    if changed:
        raise EgptError(f"--resume: {path} was collected with other settings ({', '.join(changed)}); "
                        "rerun without --resume.")
    return [TrainingSequence(**s) for s in saved["train"]], [TrainingSequence(**s) for s in saved["heldout"]]


def _load_plain(path: Path, map_location=None, mmap: bool = False):
    """Our own .pt files hold tensors and plain data only: loading them never runs code."""
    try:
        return torch.load(path, weights_only=True, map_location=map_location, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - unpickling refused or a corrupt file: one line either way
        raise EgptError(f"{path} cannot be read safely ({type(error).__name__}); delete it and rerun without --resume.") from None


def answer_labels(sequence: TrainingSequence) -> torch.Tensor:
    """The target's tokens at the answer positions (what drafting predicts)."""
    return sequence.labels[max(sequence.prefix_len - 1, 0):]


def set_draft_vocabulary(head: EagleHead, train: TrainingData | list[TrainingSequence],
                         heldout: TrainingData | list[TrainingSequence], size: int, always: list[int]) -> float:
    """Restrict the head to the `size` ids most frequent in the training answers (0: all) → held-out coverage."""
    if size == 0:
        head.draft_vocab = None
        return 1.0
    train, heldout = as_training_data(train), as_training_data(heldout)
    head.draft_vocab = draft_vocabulary(train.answers(), size, always).to(head.fc.weight.device)
    labels = torch.cat(heldout.answers()) if len(heldout) else torch.empty(0, dtype=torch.long)
    return float(torch.isin(labels, head.draft_vocab.cpu()).float().mean()) if labels.numel() else 1.0


def eagle3_aux_layers(num_layers: int) -> list[int]:
    """vLLM's default aux layers (2, L//2, L-3), which the exported config names, for a target of ≥ 3 layers."""
    if num_layers < 3:
        raise EgptError(f"--head-style eagle3 fuses three target layers (2, L/2, L-3), but this target has {num_layers}; "
                        "use --head-style eagle.")
    return default_aux_layers(num_layers)


def eagle3_vocabulary(train: TrainingData, size: int, always: list[int], vocab_size: int) -> torch.Tensor:
    """An EAGLE-3 head's draft vocabulary [K], fixed before training (its LM head has K rows): the `size` ids
    most frequent in the training answers, or all ids for 0."""
    return torch.arange(vocab_size) if size == 0 else draft_vocabulary(train.answers(), size, always)


def vocabulary_coverage(heldout: TrainingData, vocab: torch.Tensor) -> float:
    labels = torch.cat(heldout.answers()) if len(heldout) else torch.empty(0, dtype=torch.long)
    return float(torch.isin(labels, vocab.cpu()).float().mean()) if labels.numel() else 1.0


HEAD_FILES = {"eagle": ("eagle_config.json", "eagle_head.safetensors"),
              "eagle3": ("config.json", "model.safetensors", "train_report.json")}


def save_head(head: EagleHead | Eagle3Head, out: Path, report: TrainReport, model_spec: str) -> None:
    """Ours: eagle_config.json + safetensors. EAGLE-3: the public layout (vLLM / SGLang), the report beside it.
    The other layout's files go: a directory holding both would load the public one (drafts.load_draft)."""
    style = "eagle3" if isinstance(head, Eagle3Head) else "eagle"
    for name in HEAD_FILES["eagle" if style == "eagle3" else "eagle3"]:
        (out / name).unlink(missing_ok=True)
    if style == "eagle3":
        export_eagle3(head, out)
        (out / "train_report.json").write_text(json.dumps({"target": model_spec, "report": asdict(report)}, indent=1))
        return
    head.save(out, extra={"target": model_spec, "report": asdict(report)})


# ------------------------------------------------------------------------------------------ run

ProgressFactory = Callable[[str, int], Progress]  # (description, total) → advance(step)
COLLECT_JOURNAL = "collect.journal.jsonl"


@dataclass
class TrainOutcome:
    out: Path
    report: TrainReport | None  # None on a launched rank other than 0 (it only collected)
    reused_answers: int = 0

    def describe(self) -> str:
        r = self.report
        reused = f", {self.reused_answers} answers reused from the journal" if self.reused_answers else ""
        return (f"trained head → {self.out}: held-out top-1 agreement {r.heldout_top1:.3f} (train {r.train_top1:.3f}), "
                f"loss {r.final_loss:.4f}, draft vocabulary covers {100 * r.heldout_vocab_coverage:.1f} % of held-out "
                f"answer tokens, collect {r.collect_s:.0f} s, train {r.train_s:.0f} s{reused}")


def validate(config: TrainDraftConfig) -> int:
    """Every check that needs no model, → the clip count. --out is created (a writable directory)."""
    from egpt_speed.models import check_model_spec, resolve_device
    from egpt_speed.results import check_writable_dir

    if config.frames not in (1, 5):
        raise EgptError(f"--frames {config.frames} is not supported; use 5 (official pooled path) or 1.")
    for flag, value, least in (("--samples", config.samples, 1), ("--max-new-tokens", config.max_new_tokens, 1),
                               ("--batch-size", config.batch_size, 1), ("--epochs", config.epochs, 1),
                               ("--unroll", config.unroll, 0), ("--train-batch", config.train_batch, 0),
                               ("--draft-vocab", config.draft_vocab, 0)):
        if value < least:
            raise EgptError(f"{flag} must be at least {least}" + (" (0 = auto / all)." if least == 0 else "."))
    from egpt_speed.devices import resolve_dtype

    resolve_dtype(config.target_dtype)  # an unknown --target-dtype fails here, before any model loads
    check_target_quant(config.target_quant, resolve_device(config.device))
    if config.head_style not in ("auto", *HEAD_STYLES):
        raise EgptError(f"--head-style {config.head_style!r} is not supported; use auto, {' or '.join(HEAD_STYLES)}.")
    if config.head_style == "eagle3" and (config.store_features or config.eagle1_layout):
        raise EgptError("--head-style eagle3 trains online from three target layers; drop --store-features and --eagle1-layout.")
    if config.prompt_window < 0:
        raise EgptError("--prompt-window must be at least 0 (prompt positions trained on besides the answer).")
    clips = min(config.samples, 200) if config.clips is None else config.clips
    if clips < 2:
        raise EgptError("--clips must be at least 2: some clips are held out.")
    if not 0 < config.holdout < 1:
        raise EgptError(f"--holdout {config.holdout} must lie strictly between 0 and 1.")
    store_dtype_for(config.store_dtype, torch.device("cpu"))
    resolve_device(config.device)
    check_model_spec(config.model)
    check_writable_dir(config.out, "--out")
    return clips


def resolve_head_style(config: TrainDraftConfig, num_layers: int) -> TrainDraftConfig:
    """--head-style auto and --unroll 0 made concrete. EAGLE-3 is the default: at equal data on `tiny` it beat
    the EAGLE-2 head (shipped recipe, H200: held-out top-1 0.745 vs 0.707, τ 2.61 vs 2.23), and unroll 3 is
    its training-time test (1,000 answers: 0.716 / τ 2.22 vs 0.701 / 2.06 for EAGLE-2)."""
    saved = checkpoint_settings(config.out / "train_checkpoint.pt") if config.resume else {}
    style = config.head_style
    if style == "auto":  # --resume continues what the interrupted run trained (which may predate this default)
        style = saved.get("head_style") or (
            "eagle" if config.store_features or config.eagle1_layout or num_layers < 3 else "eagle3")
    if style == "eagle3":
        eagle3_aux_layers(num_layers)  # too few layers: refused now, not after the collection
    if not config.unroll and saved.get("head_style") == style:
        unroll = saved["unroll"]
    else:
        unroll = config.unroll or (3 if style == "eagle3" else 1)
    return dataclasses.replace(config, head_style=style, unroll=unroll)


def checkpoint_settings(path: Path) -> dict:
    """The training settings of an interrupted run's checkpoint ({} if none); memory-mapped, so the head and
    optimizer tensors (GBs at 7B), which _restore reads later, are not read here."""
    return _load_plain(path, map_location="cpu", mmap=True)["settings"] if path.exists() else {}


def check_target_quant(kind: str, device: torch.device) -> None:
    """--target-quant: none, or nf4 where bitsandbytes can run it (CUDA and the package), checked before loading."""
    from egpt_speed.quantize import cuda_reason, package_reason

    if kind not in TARGET_QUANTS:
        raise EgptError(f"--target-quant {kind!r} is not supported; use {' or '.join(TARGET_QUANTS)}.")
    if kind == "nf4":
        reason = cuda_reason(device, "--target-quant nf4 (bitsandbytes)") or package_reason("bitsandbytes", "bitsandbytes")
        if reason:
            raise EgptError(f"--target-quant nf4 {reason}" if reason.startswith("needs") else reason)


def load_target(config: TrainDraftConfig, device: torch.device):
    """The target in --target-dtype; with --target-quant nf4 its decoder layers' linears become bitsandbytes NF4
    (embeddings, norms and LM head stay in --target-dtype; the matmuls run in bfloat16, or float16 for a float16 target)."""
    from egpt_speed.devices import resolve_dtype
    from egpt_speed.quantize import BnbScheme, quantize_llm_bnb
    from egpt_speed.vision_graph import use_vision_mode

    target = load_model(config.model, resolve_dtype(config.target_dtype, device), device)
    use_vision_mode(target, "auto")  # Stage 3 of every training prompt: one CUDA graph replay on CUDA
    if config.target_quant == "nf4":
        compute = torch.float16 if target.llm.dtype == torch.float16 else torch.bfloat16
        quantize_llm_bnb(target.llm, BnbScheme("nf4", compute_dtype=compute), device)
    return target


def collect_with_journal(target, config: TrainDraftConfig, pairs: list, collection: dict, storage: torch.dtype | None,
                         progress: ProgressFactory | None) -> tuple[list[TrainingSequence] | list[AnswerItem] | None, int]:
    """`collect_journaled` into `collect.journal.jsonl`; launched, split over the ranks (None on ranks but 0)."""
    launch = shards.launcher()
    if launch is None:
        return collect_journaled(target, config, pairs, collection, storage, progress, config.out / COLLECT_JOURNAL)
    from egpt_speed.train_draft_shards import collect_sharded

    settings = GenerationSettings(max_new_tokens=config.max_new_tokens)
    ours = progress if launch.rank == 0 else None
    collect = lambda part, keys, path: collect_journaled(target, config, part, keys, None, ours, path)  # noqa: E731
    rebuild = lambda answers: (  # noqa: E731 - rank 0, every answer known: Stage 3 (and teacher forcing) only
        collect_answers(target, pairs, settings, config.frames, config.batch_size, None, answers) if storage is None
        else collect_batch(target, pairs, settings, config.frames, config.batch_size, storage, None, answers))
    return collect_sharded(collect, pairs, collection, config.out, launch, lambda items: [i.answer for i in items], rebuild)


def collect_journaled(target, config: TrainDraftConfig, pairs: list, collection: dict, storage: torch.dtype | None,
                      progress: ProgressFactory | None, path: Path) -> tuple[list[TrainingSequence] | list[AnswerItem], int]:
    """The target's answers to `pairs`, each batch journaled (token ids, JSON) before the next starts.

    With --resume, a journal of the same collection settings is continued: its answers are not
    generated again, the rest are. `storage` None: answers only (online training); a dtype: stored
    sequences (their features teacher-forced now). → (answers or sequences, answers reused).
    """
    from egpt_speed import journal

    digest = journal.config_hash(collection)
    known: list[list[int]] = []
    if config.resume and path.exists() and journal.find_journal(config.out, digest) == path:
        contents = journal.read_journal(path)
        known = [answer for entry in contents.entries for answer in entry["answers"]]
        records = journal.Journal.reopen(path, contents)
    else:
        path.unlink(missing_ok=True)
        records = journal.Journal.create(path, {"config_hash": digest, "kind": "train-draft-collect",
                                                "collection": collection})
    advance = progress("target answers", len(pairs)) if progress else None
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens)
    sink = lambda first, answers: records.append({"first": first, "answers": answers})  # noqa: E731
    with records:
        if storage is None:
            return collect_answers(target, pairs, settings, config.frames, config.batch_size, advance, known, sink), len(known)
        return collect_batch(target, pairs, settings, config.frames, config.batch_size, storage, advance, known, sink), len(known)


def collect_training_data(target, config: TrainDraftConfig, train_pairs: list, heldout_pairs: list, collection: dict,
                          storage: torch.dtype, progress: ProgressFactory | None) -> tuple[TrainingData, TrainingData, int]:
    """(train, held-out, answers reused): OnlineSets of journaled answers, or with --store-features
    StoredSets of sequences also saved to collected.pt (reused as a whole by --resume)."""
    pairs, count = train_pairs + heldout_pairs, len(train_pairs)
    if not config.store_features:
        items, reused = collect_with_journal(target, config, pairs, collection, None, progress)
        if items is None:  # a launched rank other than 0: rank 0 has its answers
            return None, None, reused
        aux = eagle3_aux_layers(len(target.llm.model.layers)) if config.head_style == "eagle3" else None
        return (OnlineSet(target, items[:count], config.prompt_window, aux),
                OnlineSet(target, items[count:], config.prompt_window, aux), reused)
    cache_file, reused = config.out / "collected.pt", 0
    if config.resume and cache_file.exists():
        if shards.secondary_rank():
            return None, None, 0
        train, heldout = load_collected(cache_file, collection)
    else:
        collected, reused = collect_with_journal(target, config, pairs, collection, storage, progress)
        if collected is None:
            return None, None, reused
        train, heldout = collected[:count], collected[count:]
        save_collected(cache_file, collection, train, heldout)
    return StoredSet(train, config.prompt_window), StoredSet(heldout, config.prompt_window), reused


def run(config: TrainDraftConfig, progress: ProgressFactory | None = None) -> TrainOutcome:
    """Collect (journaled), train (checkpointed each epoch), save the head to --out."""
    import time

    from egpt_speed.datasets import load_questions
    from egpt_speed.decoding import eos_ids
    from egpt_speed.devices import resolve_device
    from egpt_speed.train_draft_shards import rank_zero_first

    clip_count = validate(config)
    device = shards.local_device(resolve_device(config.device))
    storage = store_dtype_for(config.store_dtype, device)
    with rank_zero_first(config.device):  # launched: rank 0 fills the caches every rank reads (clips, SmolLM2)
        specs, data_seed = training_clips(config.data, clip_count, config.seed, config.synthetic_events)
        target = load_target(config, device)
    config = resolve_head_style(config, len(target.llm.model.layers))
    train_pairs, heldout_pairs = pairs_for(specs, load_questions(), config.samples, config.holdout, config.seed)
    collection = dict(model=config.model, data=config.data, synthetic_seed=data_seed,
                      synthetic_events=config.synthetic_events, samples=config.samples, clips=clip_count,
                      holdout=config.holdout, seed=config.seed, max_new_tokens=config.max_new_tokens, frames=config.frames,
                      target_dtype=str(target.llm.dtype).replace("torch.", ""),
                      # only when set: journals of earlier runs (no key) still resume
                      **({"target_quant": config.target_quant} if config.target_quant != "none" else {}))
    started = time.perf_counter()
    train_seqs, heldout_seqs, reused = collect_training_data(target, config, train_pairs, heldout_pairs, collection,
                                                             storage, progress)
    if train_seqs is None:  # a launched rank other than 0: its answers went to rank 0, which trains
        return TrainOutcome(config.out, None, reused)
    collect_s, started = time.perf_counter() - started, time.perf_counter()
    advance = progress("training head", config.epochs * len(train_seqs)) if progress else None
    vocab = (eagle3_vocabulary(train_seqs, config.draft_vocab, sorted(eos_ids(target)), target.llm.config.vocab_size)
             if config.head_style == "eagle3" else None)
    head, loss, train_top1, heldout_top1 = train_head(
        target, train_seqs, heldout_seqs, config.epochs, config.lr, config.seed, advance, config.unroll,
        config.train_batch or auto_train_batch(len(train_seqs)), config.out / "train_checkpoint.pt", config.resume,
        input_norm=not config.eagle1_layout, draft_vocab=vocab)
    train_s = time.perf_counter() - started
    coverage = (vocabulary_coverage(heldout_seqs, vocab) if vocab is not None else
                set_draft_vocabulary(head, train_seqs, heldout_seqs, config.draft_vocab, sorted(eos_ids(target))))
    report = TrainReport(len(train_seqs), len(heldout_seqs), config.epochs, loss, train_top1, heldout_top1, collect_s,
                         train_s, clip_record(config.data, data_seed, train_pairs, heldout_pairs),
                         draft_vocab=config.draft_vocab, heldout_vocab_coverage=coverage,
                         online=not config.store_features, prompt_window=config.prompt_window,
                         head_style=config.head_style, unroll=config.unroll)
    save_head(head, config.out, report, config.model)
    (config.out / "train_checkpoint.pt").unlink(missing_ok=True)  # the head is saved; nothing left to resume
    return TrainOutcome(config.out, report, reused)
