"""Why a candidate's greedy output left the reference's: a numerical near-tie or a real error.

At a sample's first divergence the reference model is fed its own prefix (prompt + reference
tokens before that position, one forward) and its logits there are read: top-1, top-2, their
margin, and the logit of the token the candidate chose. The candidate's token is a `near_tie`
when its gap to top-1 is within what the dtype's rounding can move that gap, else `real`.

The tolerance (one formula, `near_tie_tolerance`):

    tol = K · u · ( ‖h ⊙ (w_top1 − w_cand)‖₂ + |z_top1| + |z_cand| )

- u = eps(dtype) / 2, the unit roundoff (bfloat16 2⁻⁸, float16 2⁻¹¹, float32 2⁻²⁴);
- h [H] the final (normed) hidden state, w_t [H] the LM-head row of token t, z_t = h·w_t;
- ‖h ⊙ (w_top1 − w_cand)‖₂: the gap z_top1 − z_cand is a sum over the H hidden units; when each
  h_i carries an independent relative rounding error of size u (it is stored in `dtype`), the
  gap moves by u times the root-sum-square of its H terms (errors of random sign add in
  quadrature, not linearly: the worst case H·u would call everything a tie at H = 4096);
- |z_top1| + |z_cand|: each logit is itself rounded to `dtype` (at |z| = 20 one bfloat16 step
  is 0.125);
- K = 8 (`NEAR_TIE_K`): two paths that group the same sums differently (KV cache vs one
  forward, several verified tokens, fused kernels) do not differ by one rounding but by what
  every layer's rounding adds up to in the residual stream; K covers that amplification.
  Measured on `tiny` (SmolLM2-135M, bfloat16, CPU, 582 event tokens + 40 answer tokens): one
  forward vs the same tokens fed in 5-token cached chunks (what verification does) moved the gap
  between top-1 and each of the next 19 tokens by at most 2.06 · u · (...) (0.375 logits, logits
  ≈ 21); K = 8 leaves a factor 4 for other kernels and devices.

So a float32 gap of 1e-5 on logits of size 10 is a tie (tol ≈ 1e-5), a gap of several logits
is real in every dtype, and bfloat16's tolerance on logits of size ~15 is roughly 0.3–1 logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from egpt_speed.decoding import DecodeRequest

NEAR_TIE_K = 8.0  # amplification of one rounding through the forward (see the module docstring)
NEAR_TIE, REAL = "near_tie", "real"
FP32_COPY_NOTE = ("--fp32-check loads a second, float32 copy of the model (about 28 GB more for a 7B LLM) "
                  "and re-runs the reference decoding on the same Stage-3 features cast to float32.")


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding one real number to `dtype`."""
    return torch.finfo(dtype).eps / 2


def near_tie_tolerance(dtype: torch.dtype, hidden: torch.Tensor, w_top1: torch.Tensor, w_cand: torch.Tensor,
                       z_top1: float, z_cand: float, k: float = NEAR_TIE_K) -> float:
    """How far the logit gap z_top1 − z_cand can move from rounding in `dtype` (formula: module docstring).

    hidden: [H] final hidden state; w_top1, w_cand: [H] LM-head rows (any dtype, read in float32).
    """
    terms = hidden.float() * (w_top1.float() - w_cand.float())  # [H] the gap's summands
    return k * unit_roundoff(dtype) * (float(terms.norm()) + abs(z_top1) + abs(z_cand))


@dataclass(frozen=True)
class Divergence:
    """The first position where a candidate's tokens leave the reference's, diagnosed on the reference model."""

    id: str
    position: int
    kind: str  # NEAR_TIE or REAL
    margin: float  # reference model's top-1 minus top-2 logit at `position`
    candidate_logit_gap: float | None  # top-1 logit minus the candidate token's logit (None: candidate ended)
    tolerance: float | None
    reference_token: int | None
    candidate_token: int | None
    reference_is_top1: bool  # the teacher-forced argmax is the reference's own token

    def to_dict(self) -> dict:
        return asdict(self)


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """First index where the two token lists differ (a length difference counts); None when equal."""
    for index, (r, c) in enumerate(zip(reference, candidate)):
        if r != c:
            return index
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


@torch.inference_mode()
def last_position_state(model, request: DecodeRequest, prefix_tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over [spliced prompt, prefix_tokens]: (final hidden state [H], logits [V] in float32) at the end."""
    embeds = model.splice(request.prompt_ids, request.event_features)  # [1, L, H]
    if prefix_tokens:
        ids = torch.tensor(list(prefix_tokens), device=embeds.device)
        tokens = model.llm.get_input_embeddings()(ids).unsqueeze(0).to(embeds.dtype)  # [1, n, H]
        embeds = torch.cat([embeds, tokens], dim=1)
    attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention).last_hidden_state[0, -1]  # [H]
    logits = model.llm.get_output_embeddings()(hidden.unsqueeze(0))[0]  # [V] in the model's dtype
    return hidden, logits.float()


@torch.inference_mode()
def diagnose(model, request: DecodeRequest, reference: Sequence[int], candidate: Sequence[int],
             dtype: torch.dtype | None = None, k: float = NEAR_TIE_K) -> Divergence | None:
    """Classify the first divergence of `candidate` from `reference` on the reference `model`; None when equal.

    dtype: whose rounding the tolerance allows for (default: the model's own). Greedy outputs
    only: under sampling a different token is not evidence of anything.
    """
    position = first_divergence(reference, candidate)
    if position is None:
        return None
    ref_token = reference[position] if position < len(reference) else None
    cand_token = candidate[position] if position < len(candidate) else None
    hidden, logits = last_position_state(model, request, reference[:position])
    top = logits.topk(2)
    z1, z2, top1 = float(top.values[0]), float(top.values[1]), int(top.indices[0])
    is_top1 = ref_token == top1
    if cand_token is None:  # the candidate stopped early without choosing a token here: nothing can excuse it
        return Divergence(request.id, position, REAL, z1 - z2, None, None, ref_token, None, is_top1)
    z_cand = float(logits[cand_token])
    rows = model.llm.get_output_embeddings().weight  # [V, H]
    tolerance = near_tie_tolerance(dtype or logits_dtype(model), hidden, rows[top1], rows[cand_token], z1, z_cand, k)
    gap = z1 - z_cand
    kind = NEAR_TIE if gap <= tolerance else REAL
    return Divergence(request.id, position, kind, z1 - z2, gap, tolerance, ref_token, cand_token, is_top1)


def logits_dtype(model) -> torch.dtype:
    """The dtype the reference computes in (the LLM's floating dtype; quantised weights report their compute dtype)."""
    return model.llm.dtype


def agreement_keys(sample_ids: Sequence[str], divergences: Sequence[Divergence | None]) -> dict:
    """Per-comparison keys: `divergences`, `real_divergence_count`, `lossless_up_to_numerics_rate`.

    A sample is lossless up to numerics when it is exact or its first divergence is a near-tie
    (after a first divergence the two continue from different prefixes, so later differences
    say nothing more about the candidate).
    """
    found = [d for d in divergences if d is not None]
    real = sum(1 for d in found if d.kind == REAL)
    count = len(sample_ids)
    return {"divergences": [d.to_dict() for d in found], "real_divergence_count": real,
            "near_tie_count": len(found) - real,
            "lossless_up_to_numerics_rate": (count - real) / count if count else None}


def hf_generate_tokens(model, request: DecodeRequest) -> list[int]:
    """The baseline's decoding (transformers generate), untimed: the default reference for the floor."""
    from egpt_speed.hf_generate import generate_baseline
    from egpt_speed.timing import Clock

    clock = Clock(request.event_features.device)
    clock.begin()
    return generate_baseline(model, request, clock).token_ids


def numerical_floor(model_fp32, requests: Sequence[DecodeRequest], reference_tokens: Sequence[Sequence[int]],
                    dtype: torch.dtype, decode: Callable[[object, DecodeRequest], list[int]] = hf_generate_tokens) -> dict:
    """How often the reference decoding itself changes between its dtype and float32 (the noise floor).

    model_fp32: a float32 copy of the reference model; requests: the counted samples (their
    Stage-3 features are cast to float32); reference_tokens: what the reference produced in its
    own dtype (`dtype`); decode(model, request) → tokens: the reference's decoding (default:
    transformers generate, as `baseline`). Each
    sample where they differ is diagnosed on the float32 model with `dtype`'s tolerance: a
    `real` one would mean the reduced-precision reference is itself wrong, not merely rounded.
    """
    differing, rates, diagnosed = [], [], []
    for request, tokens in zip(requests, reference_tokens):
        fp32_request = DecodeRequest(request.id, request.prompt_ids, request.event_features.float(), request.settings)
        fp32_tokens = decode(model_fp32, fp32_request)
        rates.append(sum(a == b for a, b in zip(tokens, fp32_tokens)) / max(len(fp32_tokens), 1))
        if list(fp32_tokens) != list(tokens):
            differing.append(request.id)
            diagnosed.append(diagnose(model_fp32, fp32_request, fp32_tokens, tokens, dtype=dtype))
    count = len(rates)
    return {"samples": count, "differs_from_fp32": len(differing),
            "exact_match_rate_vs_fp32": (count - len(differing)) / count if count else None,
            "token_match_rate_vs_fp32": sum(rates) / count if count else None, "differing_ids": differing,
            "divergences": [d.to_dict() for d in diagnosed if d is not None],
            "real_divergence_count": sum(1 for d in diagnosed if d is not None and d.kind == REAL),
            "note": FP32_COPY_NOTE}


# ---- wiring helpers: per-sample record key "divergence", per-comparison keys --------------------------

RECORD_KEY = "divergence"  # on a candidate's sample record: the Divergence as a dict, None when exact


def diagnose_record(reference_model, request: DecodeRequest, reference_tokens: Sequence[int],
                    candidate_tokens: Sequence[int]) -> dict | None:
    """What the runner stores under RECORD_KEY for one candidate sample (untimed; greedy runs only)."""
    found = diagnose(reference_model, request, reference_tokens, candidate_tokens)
    return found.to_dict() if found is not None else None


def comparison_keys(reference_samples: Sequence[dict], candidate_samples: Sequence[dict]) -> dict:
    """`divergences`, `real_divergence_count`, `lossless_up_to_numerics_rate` (+ near-tie and undiagnosed counts).

    Reads RECORD_KEY from each candidate record. A divergent sample without a diagnosis (sampling,
    a batched candidate, a result written before diagnosis existed) counts as undiagnosed and
    never as lossless.
    """
    found, undiagnosed = [], 0
    for reference, candidate in zip(reference_samples, candidate_samples):
        if list(reference["token_ids"]) == list(candidate["token_ids"]):
            continue
        if candidate.get(RECORD_KEY) is None:
            undiagnosed += 1
            continue
        found.append(Divergence(**candidate[RECORD_KEY]))
    count = min(len(reference_samples), len(candidate_samples))
    keys = agreement_keys([str(i) for i in range(count)], found)
    keys["undiagnosed_count"] = undiagnosed
    if count:
        keys["lossless_up_to_numerics_rate"] = (count - keys["real_divergence_count"] - undiagnosed) / count
    return keys
