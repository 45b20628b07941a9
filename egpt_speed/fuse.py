"""Fused projections: one GEMM for a Llama layer's q/k/v and one for its gate/up, outputs unchanged.

At batch 1 a decode step is a chain of GEMVs; fusing q, k, v (and gate, up) reads the same weights
in fewer, larger kernels (gpt-fast's `wqkv`, vLLM's `QKVParallelLinear`). transformers' Llama
attention and MLP call `q_proj`, `k_proj`, `v_proj` (and `gate_proj`, `up_proj`) one after the other
on the same input, and their forwards differ across transformers versions (5.17: `past_key_values`,
5.24: `cache`). So instead of rewriting those forwards, the first projection becomes a `_FusedLead`
that runs the fused GEMM, returns its own slice and hands the others to its `_FusedFollower`
siblings through a shared `_Handoff`, which they return. Each follower checks it is fed the lead's
input (same shape) and that the lead ran first, so a changed call order fails loudly instead of
silently mixing up projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from egpt_speed.errors import EgptError

FUSED_GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class _Handoff:
    """The lead's outputs for its followers: one slice per follower, cleared once the last one has read."""

    def __init__(self, followers: int):
        self.parts: list[torch.Tensor | None] = [None] * followers


class _FusedLead(nn.Module):
    """The first projection of a group: fused GEMM → its own slice; the other slices go to the handoff."""

    def __init__(self, fused: nn.Linear, sizes: list[int], handoff: _Handoff):
        super().__init__()
        self.fused, self.sizes, self.handoff = fused, sizes, handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.fused(x).split(self.sizes, dim=-1)
        self.handoff.parts = list(rest)
        return first


class _FusedFollower(nn.Module):
    """A later projection of a group: returns the slice its lead computed for the same input."""

    def __init__(self, index: int, out_features: int, handoff: _Handoff, name: str):
        super().__init__()
        self.index, self.out_features, self.handoff, self.name = index, out_features, handoff, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = self.handoff.parts[self.index]
        if part is None or part.shape[:-1] != x.shape[:-1]:
            raise EgptError(f"fused projection {self.name} ran before its group's first projection; "
                            "this transformers version calls the projections in another order: drop `fused`.")
        self.handoff.parts[self.index] = None
        return part


@dataclass
class FuseReport:
    groups: int = 0  # groups fused (per layer: attention q/k/v, MLP gate/up)
    layers: int = 0


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """[Linear(H → n_i)] sharing their input → Linear(H → Σ n_i) with the weights (and biases) stacked."""
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=has_bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([l.weight for l in linears], dim=0))
        if has_bias:
            fused.bias.copy_(torch.cat([l.bias for l in linears], dim=0))
    return fused


def _fuse_group(parent: nn.Module, names: tuple[str, ...]) -> bool:
    linears = [getattr(parent, name, None) for name in names]
    if not all(type(l) is nn.Linear for l in linears):
        return False  # already fused, quantized or another layout: leave it
    if len({l.in_features for l in linears}) != 1 or len({l.bias is None for l in linears}) != 1:
        return False
    handoff = _Handoff(len(linears) - 1)
    setattr(parent, names[0], _FusedLead(fuse_linears(linears), [l.out_features for l in linears], handoff))
    for index, (name, linear) in enumerate(zip(names[1:], linears[1:])):
        setattr(parent, name, _FusedFollower(index, linear.out_features, handoff, name))
    return True


def fuse_projections(llm) -> FuseReport:
    """Fuse every decoder layer's q/k/v and gate/up of a transformers Llama-style causal LM, in place."""
    layers = getattr(getattr(llm, "model", None), "layers", None)
    if layers is None:
        raise EgptError("fused projections need a Llama-style LLM (model.layers); use the strategy without `fused`.")
    report = FuseReport(layers=len(layers))
    for layer in layers:
        for attribute, names in FUSED_GROUPS.items():
            parent = getattr(layer, attribute, None)
            if parent is not None and _fuse_group(parent, names):
                report.groups += 1
    if report.groups == 0:
        raise EgptError("no q/k/v or gate/up projections to fuse in this LLM (already fused or quantized); drop `fused`.")
    return report
