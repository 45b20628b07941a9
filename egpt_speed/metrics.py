"""Every formula the reports use, defined once."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch


def per_token_ms(decode_ms: float, num_tokens: int) -> float | None:
    """Decode time per token after the first: the first token belongs to prefill (TTFT).

    The seed divided by the wrong quantity ("0.6 ms/token"); here it is decode_ms / (n − 1).
    """
    if num_tokens < 2:
        return None
    return decode_ms / (num_tokens - 1)


def tokens_per_s(decode_ms: float, num_tokens: int) -> float | None:
    ms = per_token_ms(decode_ms, num_tokens)
    return None if not ms else 1e3 / ms


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """mean, median, p10, p90, q1, q3, min, max, std of a sample (empty → {})."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return {}

    def q(fraction: float) -> float:
        position = fraction * (len(data) - 1)
        low = int(position)
        high = min(low + 1, len(data) - 1)
        return data[low] + (data[high] - data[low]) * (position - low)

    return {"mean": statistics.fmean(data), "median": q(0.5), "p10": q(0.1), "p90": q(0.9), "q1": q(0.25),
            "q3": q(0.75), "min": data[0], "max": data[-1], "std": statistics.pstdev(data) if len(data) > 1 else 0.0}


@dataclass(frozen=True)
class Agreement:
    """Candidate vs reference token ids for one sample (greedy)."""

    exact_match: bool
    token_match_rate: float  # position-wise equal ids / reference length
    first_divergence: int | None  # first index where they differ (None when identical)
    common_prefix_len: int


def agreement(reference: Sequence[int], candidate: Sequence[int]) -> Agreement:
    matches = sum(1 for r, c in zip(reference, candidate) if r == c)
    prefix = 0
    for r, c in zip(reference, candidate):
        if r != c:
            break
        prefix += 1
    identical = list(reference) == list(candidate)
    rate = matches / len(reference) if reference else float(not candidate)
    return Agreement(identical, rate, None if identical else prefix, prefix)


def accept_rate(accepted: int, drafted: int) -> float | None:
    """α: accepted draft tokens / drafted tokens."""
    return accepted / drafted if drafted else None


def mean_accepted_tokens(accepted: int, verify_steps: int) -> float | None:
    """τ: tokens committed per verification step, the bonus included, the prefill forward excluded
    = 1 + accepted / steps (Spec-Bench's τ, vLLM's mean acceptance length; a perfect draft at γ = 4
    gives 5.0)."""
    return 1 + accepted / verify_steps if verify_steps else None


def tokens_per_target_forward(num_tokens: int, target_forwards: int) -> float | None:
    """New tokens / target forwards, the prefill forward and its first token included (the figure
    this project reported as mean accepted tokens before τ was fixed)."""
    return num_tokens / target_forwards if target_forwards else None


@dataclass
class SpeculationCounters:
    """What the speculative loop counts for one sample; `speculation_metrics` turns it into result keys."""

    gamma: int
    target_forwards: int = 0  # prefill included
    draft_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    tree_nodes: int = 0  # drafted tree nodes verified (tree drafting only)

    @property
    def verify_steps(self) -> int:
        return max(self.target_forwards - 1, 0)

    def record(self, proposed: int, accepted: int) -> None:
        """One verification step: `proposed` draft tokens (tree: its depth), the first `accepted` kept."""
        width = max(len(self.drafted_by_position), proposed)
        self.drafted_by_position += [0] * (width - len(self.drafted_by_position))
        self.accepted_by_position += [0] * (width - len(self.accepted_by_position))
        for position in range(proposed):
            self.drafted_by_position[position] += 1
            self.accepted_by_position[position] += int(position < accepted)
        self.drafted += proposed
        self.accepted += accepted
        self.target_forwards += 1


def speculation_metrics(counters: SpeculationCounters, num_tokens: int, draft_ms: float, verify_ms: float) -> dict:
    """Per-sample result keys of a speculative decode (c = draft step / verify step, both measured)."""
    draft_step_ms = draft_ms / counters.draft_forwards if counters.draft_forwards else None
    verify_step_ms = verify_ms / counters.verify_steps if counters.verify_steps else None
    return {"gamma": counters.gamma, "target_forwards": counters.target_forwards,
            "draft_forwards": counters.draft_forwards, "drafted": counters.drafted, "accepted": counters.accepted,
            "accept_rate": accept_rate(counters.accepted, counters.drafted),
            "mean_accepted_tokens": mean_accepted_tokens(counters.accepted, counters.verify_steps),
            "tokens_per_target_forward": tokens_per_target_forward(num_tokens, counters.target_forwards),
            "accepted_by_position": counters.accepted_by_position, "drafted_by_position": counters.drafted_by_position,
            "cost_ratio": ratio(draft_step_ms, verify_step_ms) if draft_step_ms else None}


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E = (1 − α^(γ+1)) / (1 − α): expected tokens per verify step (Leviathan et al. 2023)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Leviathan et al.: E / (γ·c + 1), c = draft step cost / target step cost."""
    return expected_tokens_per_step(alpha, gamma) / (gamma * cost_ratio + 1)


def mbu(bytes_per_token: float, per_token_ms_value: float | None, bandwidth_bytes_per_s: float | None) -> float | None:
    """Memory-bandwidth utilisation: bytes read per decoded token / per-token time / measured bandwidth.

    The bandwidth is a copy's read+write rate, so a decode step that only reads is compared with
    the same bytes-moved figure.
    """
    if not per_token_ms_value or not bandwidth_bytes_per_s:
        return None
    return bytes_per_token / (per_token_ms_value / 1e3) / bandwidth_bytes_per_s


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def aggregate_per_token_ms(decode_ms: Sequence[float], num_tokens: Sequence[int]) -> float | None:
    """Token-weighted ms/token over many samples: Σ decode_ms / Σ (n − 1)."""
    steps = sum(max(n - 1, 0) for n in num_tokens)
    return sum(d for d, n in zip(decode_ms, num_tokens) if n > 1) / steps if steps else None


def speculation_summary(samples: Sequence[dict]) -> dict:
    """Run-level speculative metrics from per-sample counters (sums, not means of ratios)."""
    drafted = sum(s.get("drafted", 0) for s in samples)
    accepted = sum(s.get("accepted", 0) for s in samples)
    forwards = sum(s.get("target_forwards", 0) for s in samples)
    tokens = sum(s["num_tokens"] for s in samples)
    by_position_accepted: list[int] = []
    by_position_drafted: list[int] = []
    for sample in samples:
        for k, (a, d) in enumerate(zip(sample.get("accepted_by_position", []), sample.get("drafted_by_position", []))):
            if k >= len(by_position_accepted):
                by_position_accepted.append(0)
                by_position_drafted.append(0)
            by_position_accepted[k] += a
            by_position_drafted[k] += d
    # every sample's first target forward is its prefill, not a verification step
    steps = sum(max(s.get("target_forwards", 0) - 1, 0) for s in samples)
    summary = {"drafted": drafted, "accepted": accepted, "target_forwards": forwards,
               "accept_rate": accept_rate(accepted, drafted),
               "mean_accepted_tokens": mean_accepted_tokens(accepted, steps),
               "tokens_per_target_forward": tokens_per_target_forward(tokens, forwards),
               "acceptance_by_position": [accept_rate(a, d) for a, d in zip(by_position_accepted, by_position_drafted)]}
    ratios = [s["cost_ratio"] for s in samples if s.get("cost_ratio") is not None]
    gammas = [s["gamma"] for s in samples if s.get("gamma")]
    if ratios and gammas and summary["accept_rate"] is not None:
        c = statistics.median(ratios)
        gamma = round(statistics.median(gammas))
        summary["cost_ratio"] = c
        summary["predicted_speedup"] = predicted_speedup(summary["accept_rate"], gamma, c)
        # the same cost model fed the measured τ (tokens per verify step) as E: right also where
        # acceptance is not i.i.d. per position (a draft tree, a head whose later positions decay)
        if summary["mean_accepted_tokens"] is not None:
            summary["predicted_speedup_measured_e"] = summary["mean_accepted_tokens"] / (gamma * c + 1)
    return summary


# Byte accounting: weights and KV cache read per decoded token (the numerator of MBU).

def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def minus(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def vision_bytes(model) -> int:
    modules = [model.vision_tower, model.projector] + ([model.adaptor] if model.adaptor is not None else [])
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.llm.parameters()) + sum(
        b.numel() * b.element_size() for b in model.llm.buffers())


def bytes_per_decoded_token(model, context_len: float, llm_bytes: int | None = None) -> float:
    """Weights read per token (the embedding table only one row of it) + the KV cache read."""
    config = model.llm.config
    total = llm_bytes if llm_bytes is not None else weight_bytes(model)
    embed = model.llm.get_input_embeddings().weight
    if not config.tie_word_embeddings:
        total -= embed.numel() * embed.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.finfo(model.llm.dtype).bits // 8
    kv_per_position = 2 * config.num_hidden_layers * kv_heads * head_dim * element
    return total + kv_per_position * context_len
