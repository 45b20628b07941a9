"""Checks of a run's options against every strategy that will see them, before any model loads."""

from __future__ import annotations

import math

import torch

from egpt_speed.drafts import check_draft_spec
from egpt_speed.errors import EgptError
from egpt_speed.static_decode import COMPILE_MODES, DRAFT_COMPILE_MODES, resolve_compile_mode


def check_strategy_names(strategies: list[str]) -> None:
    """No strategy twice in one run (preparers that override each other: registry.check_overrides)."""
    if not strategies:
        raise EgptError("name at least one strategy, e.g. `egpt-speed run baseline`.")
    seen = set()
    for name in strategies:
        if name in seen:
            raise EgptError(f"strategy {name!r} is listed twice; name each strategy once.")
        seen.add(name)


def check_compile_modes(options: dict) -> None:
    """--compile-mode and --draft-compile name modes the static engine / captured drafter know."""
    for flag, key, modes in (("--compile-mode", "compile_mode", COMPILE_MODES),
                             ("--draft-compile", "draft_compile", DRAFT_COMPILE_MODES)):
        value = options.get(key)
        if value not in (None, "", "none") and value not in modes:
            raise EgptError(f"{flag} {value!r} is not one of none, {', '.join(m for m in modes if m)}; pick one.")


def check_coordinate_descent(options: dict, strategies: list[str], device: torch.device) -> None:
    """--coordinate-descent / --no-coordinate-descent tune what compile compiles: refused where nothing is."""
    choice = options.get("coordinate_descent")
    if choice is None:
        return
    flag = "--coordinate-descent" if choice else "--no-coordinate-descent"
    if not any("compile" in s.split("+") for s in strategies):
        raise EgptError(f"{flag} sets how compile's decode step is compiled; add a compile strategy or drop it.")
    if resolve_compile_mode(options.get("compile_mode"), device) is None:
        raise EgptError(f"{flag} tunes inductor's kernels, which compile does not use here (--compile-mode none, "
                        "the CPU's default); add --compile-mode default or drop the flag.")


def check_flex(strategies: list[str], batch_size: int) -> None:
    """`flex` takes one boolean mask per call, built by compile's static engine for a draft tree."""
    for expression in strategies:
        parts = expression.split("+")
        if "flex" in parts and "eagle-tree" in parts and "compile" not in parts:
            raise EgptError(f"{expression}: the eager eagle-tree builds additive tree masks that flex does not take; "
                            "use flex+compile+eagle-tree or drop flex.")
        if "flex" in parts and batch_size > 1:
            raise EgptError(f"{expression}: the flex attention runs batch 1; use --batch-size 1 or drop flex.")


def speculates_on_compile(strategy: str) -> bool:
    """A composition whose speculative decoder borrows compile's static target and captured drafter
    (compile+eagle, eagle+compile, fused+compile+eagle-tree, compile+speculative with an EAGLE head, ...)."""
    parts = strategy.split("+")
    return "compile" in parts and any(p in ("eagle", "eagle-tree", "speculative") for p in parts)


def check_speculation_flags(options: dict, strategies: list[str], do_sample: bool = False) -> None:
    """--fused-step and --draft-compile change the captured EAGLE drafter of compile+eagle(-tree): refuse them
    where no strategy has one, instead of ignoring them."""
    captured_drafter = any(speculates_on_compile(s) for s in strategies)
    if options.get("fused_step") and not captured_drafter:
        raise EgptError("--fused-step fuses the step of compile+eagle / compile+eagle-tree; add one or drop it.")
    if options.get("fused_step") and do_sample:  # sampled runs draft with the eager head: nothing would be fused
        raise EgptError("--fused-step fuses the greedy step; drop --sample or --fused-step.")
    if options.get("fused_step") and options.get("adaptive_gamma"):
        raise EgptError("--fused-step captures a step of fixed γ; drop --adaptive-gamma or --fused-step.")
    if options.get("fused_step") and options.get("compile_mode") == "reduce-overhead":
        raise EgptError("--fused-step captures its step itself; use another --compile-mode than reduce-overhead.")
    if options.get("fused_step") and options.get("draft_compile") not in (None, "", "none"):
        raise EgptError("--fused-step compiles the drafter inside its step graph; drop --draft-compile or --fused-step.")
    if options.get("draft_compile") not in (None, "", "none") and not captured_drafter:
        raise EgptError("--draft-compile compiles the drafter of compile+eagle / compile+eagle-tree; add one or drop it.")


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    """The sampling settings every sampler (baseline, speculative, trees, batch) will be given."""
    if not do_sample:
        return
    if not math.isfinite(temperature) or temperature <= 0:
        raise EgptError(f"--temperature {temperature} is not allowed with --sample; pass a value > 0.")
    if not (0 < top_p <= 1):
        raise EgptError(f"--top-p {top_p} is not allowed with --sample; pass a value in (0, 1].")


def check_draft_and_counts(options: dict, draft: str | None, model_spec: str) -> None:
    """--draft, --tree-topk, --tree-nodes and --pld-ngram, refused before any model loads (they were only checked
    when a strategy read them, after the target had loaded, and --pld-ngram 0 silently ran with 3)."""
    check_draft_spec(draft, model_spec)
    for flag, key in (("--tree-topk", "tree_topk"), ("--tree-nodes", "tree_nodes"), ("--pld-ngram", "pld_ngram")):
        value = options.get(key)
        if value is not None and int(value) < 1:
            raise EgptError(f"{flag} must be at least 1.")
