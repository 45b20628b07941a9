"""`egpt-speed train-draft`: fit an EAGLE head to a target on its own answers to event clips.

1. collect — for (clip, question) pairs, run Stages 1–3 and the target's own greedy answer, then
   one teacher-forced target forward over [prefix, answer] for its post-norm features.
2. train — the head maps (f_t, e_{t+1}) → f_{t+1}; loss = SmoothL1 on features + 0.1 × CE of the
   target's LM head on the prediction against the target's next token (EAGLE's recipe), on the
   answer positions only (the head still reads the prefix, as it does when drafting).
3. report — teacher-forced top-1 agreement with the target on held-out clips *and* questions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from egpt_speed.datasets import SampleSpec
from egpt_speed.decoding import DecodeRequest, GenerationSettings
from egpt_speed.eagle import EagleHead, head_config_from_target
from egpt_speed.errors import EgptError
from egpt_speed.stages import stage1_load, stage2_preprocess, stage3_vision
from egpt_speed.timing import Clock


@dataclass
class TrainingSequence:
    features: torch.Tensor  # [1, T, H] target post-norm features for positions 0..T-1 (CPU)
    input_embeds: torch.Tensor  # [1, T + 1, H] inputs at positions 0..T (prefix rows, then answer tokens)
    labels: torch.Tensor  # [T] the target's greedy token after position t (argmax of its LM head)
    prefix_len: int


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


@torch.no_grad()  # not inference_mode: the stored tensors feed autograd during training
def collect_sequence(model, spec: SampleSpec, question: str, settings: GenerationSettings, frames: int,
                     decode) -> TrainingSequence:
    spec = SampleSpec(spec.id, spec.event_path, spec.image_paths, spec.image_1f_paths, question)
    encoded = stage3_vision(stage2_preprocess(stage1_load(spec, "npy", frames), model, frames), model)
    encoded.event_features = encoded.event_features.clone()  # out of inference mode
    request = DecodeRequest(spec.id, encoded.prompt_ids, encoded.event_features, settings)
    clock = Clock(model.device, enabled=False)
    clock.begin()
    answer = decode(model, request, clock).token_ids
    prefix = model.splice(encoded.prompt_ids, encoded.event_features)  # [1, L, H]
    answer_embeds = model.llm.get_input_embeddings()(torch.tensor(answer, device=model.device)).unsqueeze(0)
    inputs = torch.cat([prefix, answer_embeds], dim=1)  # [1, L + n, H]
    features = model.llm.model(inputs_embeds=inputs[:, :-1]).last_hidden_state  # [1, L + n - 1, H]
    labels = model.llm.lm_head(features)[0].argmax(-1)
    return TrainingSequence(features.float().cpu(), inputs.float().cpu(), labels.cpu(), prefix.shape[1])


def head_loss(head: EagleHead, lm_head, sequence: TrainingSequence, device: torch.device,
              unroll: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, first-step top-1 hits on answer positions) of one sequence.

    Step 1 is teacher-forced on the target's features. Steps 2..`unroll` feed the head its own
    predictions, as chain drafting does at positions 2..γ (without this, acceptance collapses
    after the first draft position — "training-time test", as in HASS / EAGLE-3).
    """
    features = sequence.features.to(device)
    inputs = sequence.input_embeds.to(device)
    T = features.shape[1]
    start = max(sequence.prefix_len - 2, 0)  # from the last prefix rows on: what drafting uses
    current = features[:, :-1]
    total = torch.zeros((), device=device)
    first_hits = None
    for step in range(1, unroll + 1):
        length = T - step  # predictions for positions step..T-1
        if length <= start:
            break
        positions = torch.arange(step - 1, step - 1 + length, device=device)
        predicted = head(current[:, :length], inputs[:, step:step + length], positions)  # ≈ features[step:]
        prediction = predicted[:, start:]
        logits = lm_head(prediction)[0].float()
        labels = sequence.labels[start + step:].to(device)
        total = total + (F.smooth_l1_loss(prediction.float(), features[:, start + step:].float())
                         + 0.1 * F.cross_entropy(logits, labels)) / step
        if first_hits is None:
            first_hits = logits.argmax(-1) == labels
        current = predicted
    return total, first_hits


def train_head(model, train: list[TrainingSequence], heldout: list[TrainingSequence], epochs: int, lr: float,
               seed: int, progress: Callable[[int], None] | None = None, unroll: int = 1) -> tuple[EagleHead, float, float, float]:
    torch.manual_seed(seed)
    device = model.device
    head = EagleHead(head_config_from_target(model.llm.config)).to(device=device, dtype=torch.float32)
    with torch.no_grad():  # start from the target's last layer: a far better init than random
        head.layer.load_state_dict(model.llm.model.layers[-1].state_dict())
        hidden = model.llm.config.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden].copy_(torch.eye(hidden))
        head.fc.bias.zero_()
    lm_head = model.llm.lm_head.float()
    for parameter in lm_head.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * len(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    last = float("nan")
    for _ in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for index in order:
            loss, _ = head_loss(head, lm_head, train[index], device, unroll)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            last = float(loss.detach())
            if progress:
                progress(1)
    head.eval()
    return head, last, top1(head, lm_head, train, device), top1(head, lm_head, heldout, device)


@torch.no_grad()
def top1(head: EagleHead, lm_head, sequences: list[TrainingSequence], device: torch.device) -> float:
    hits = total = 0
    for sequence in sequences:
        _, correct = head_loss(head, lm_head, sequence, device)
        hits += int(correct.sum())
        total += correct.numel()
    return hits / total if total else 0.0


def save_head(head: EagleHead, out: Path, report: TrainReport, model_spec: str) -> None:
    head.save(out, extra={"target": model_spec, "report": report.__dict__})
