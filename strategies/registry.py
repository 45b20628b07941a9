"""The Stage-4 strategy protocol, the name → strategy registry and `a+b` composition.

Built-in strategies are the modules of this package (discovered, never imported by name from the
core); third parties register classes through the ``egpt_speed.strategies`` entry-point group.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from egpt_speed.decoding import DecodeRequest, DecodeResult
from egpt_speed.errors import EgptError
from egpt_speed.speculation import DynamicTarget, Target
from egpt_speed.options import MeasureOptions, default_strategy_options
from egpt_speed.timing import Clock

ENTRY_POINT_GROUP = "egpt_speed.strategies"


@dataclass(frozen=True)
class RunContext:
    """Run-wide settings a strategy may read (from the CLI)."""

    device: torch.device
    dtype: torch.dtype
    model_spec: str = MeasureOptions.model
    draft_spec: str | None = None
    gamma: int = MeasureOptions.gamma
    batch_size: int = MeasureOptions.batch_size
    options: dict[str, Any] = field(default_factory=default_strategy_options)  # the CLI's defaults, overridable


class Strategy:
    """One way of running Stage 4.

    A strategy declares what it needs (`unavailable_reason`), may change the loaded model once
    (`prepare`: quantize, set attention, load a draft) and turns one `DecodeRequest` into tokens
    (`decode`). Preparers (``decodes = False``) leave the loop to the composed decoder, or to
    ``baseline`` when none is given.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    decodes: ClassVar[bool] = True
    modifies_model: ClassVar[bool] = False  # prepare changes the model: it needs its own copy in compare
    lossless: ClassVar[bool] = True
    # Composed with another decoder, a target lender (compile: `lends_target`) does not decode: it lends
    # the decoder that `accepts_lent_target` (speculative, pld, early-exit) the target it verifies on.
    lends_target: ClassVar[bool] = False
    accepts_lent_target: ClassVar[bool] = False
    # What a preparer sets on the model (e.g. the attention implementation): two parts of one composition
    # that set the same thing are refused, since the last would silently win.
    sets: ClassVar[str | None] = None

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.lender: Strategy | None = None  # set by `build` for e.g. compile+speculative

    def lend_target(self, model, max_seq: int, gamma: int):
        """A speculative target (speculation.Target: prefill / verify / crop) with room for max_seq positions."""
        raise NotImplementedError

    def lend_drafter(self, head, model, prefix_embeds: torch.Tensor, settings, gamma: int, tree=None):
        """A lender's own drafter for an EAGLE head (compile: graph-captured), or None for the eager one."""
        return None

    def verify_target(self, model, prefix_embeds: torch.Tensor, settings) -> Target:
        """The target this decoder verifies on: its lender's (compile+speculative: a static-cache
        StaticTarget), else a DynamicTarget on the model's LLM. prefix_embeds: [1, L, H]."""
        if self.lender is None:
            return DynamicTarget(model.llm)
        return self.lender.lend_target(model, prefix_embeds.shape[1] + settings.max_new_tokens, self.ctx.gamma)

    def unavailable_reason(self) -> str | None:
        """None when it can run here, else one sentence saying why not (missing package, no CUDA)."""
        return None

    def prepare(self, model) -> None:
        """One-time change of the loaded EventGPT (quantize, attention backend, draft loading)."""

    def decode(self, model, request: DecodeRequest, clock: Clock) -> DecodeResult:
        raise NotImplementedError

    def decode_batch(self, model, requests: list[DecodeRequest], clock: Clock) -> list[DecodeResult]:
        raise EgptError(f"strategy {self.name!r} decodes one prompt at a time; use it with --batch-size 1.")

    @property
    def batched(self) -> bool:
        return False

    def settings(self) -> dict[str, Any]:
        """What to record about this strategy's configuration in the result file."""
        return {}


class ComposedStrategy(Strategy):
    """`a+b+c`: the preparers prepare in order, then the decoding parts; the one decoding part (or baseline) owns the loop."""

    def __init__(self, ctx: RunContext, parts: list[Strategy], decoder: Strategy):
        super().__init__(ctx)
        self.parts = parts
        self.decoder = decoder
        self.name = "+".join(p.name for p in parts)  # type: ignore[misc]
        self.summary = " + ".join(p.summary for p in parts)  # type: ignore[misc]
        self.modifies_model = any(p.modifies_model for p in parts)  # type: ignore[misc]
        self.lossless = all(p.lossless for p in parts)  # type: ignore[misc]

    def unavailable_reason(self) -> str | None:
        for part in self.parts:
            reason = part.unavailable_reason()
            if reason:
                return f"{part.name}: {reason}"
        return None

    def prepare(self, model) -> None:
        """Preparers (they change the model) in the order given, then the parts that decode on it: compile+fused
        builds its engine on the fused LLM like fused+compile."""
        preparers = [part for part in self.parts if not part.decodes]
        lenders = [part for part in self.parts if part.decodes and part is not self.decoder]
        for part in preparers + lenders:
            part.prepare(model)
        self.decoder.prepare(model)

    def decode(self, model, request, clock):
        return self.decoder.decode(model, request, clock)

    def decode_batch(self, model, requests, clock):
        return self.decoder.decode_batch(model, requests, clock)

    @property
    def batched(self) -> bool:
        return self.decoder.batched

    def settings(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(part.settings())
        return merged


_REGISTRY: dict[str, type[Strategy]] = {}
_LOADED = False


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two strategies are named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    package_dir = Path(__file__).parent
    for module in pkgutil.iter_modules([str(package_dir)]):
        if module.name != "registry":
            importlib.import_module(f"{__package__}.{module.name}")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if isinstance(loaded, type) and issubclass(loaded, Strategy):
            register(loaded)
    _LOADED = True


def available() -> dict[str, type[Strategy]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def check_overrides(expression: str, parts: list[Strategy]) -> None:
    """Refuse a composition of two parts that set the same thing on the model (eager+sdpa, nf4+int8wo)."""
    for what in {part.sets for part in parts if part.sets}:
        clashing = [part.name for part in parts if part.sets == what]
        if len(clashing) > 1:
            raise EgptError(f"{expression!r} composes {' and '.join(clashing)}, which both set {what}; keep one.")


def build(expression: str, ctx: RunContext) -> Strategy:
    """`name` or `a+b+...` → a strategy instance; unknown names and two decoders are refused."""
    registry = available()
    names = [n.strip() for n in expression.split("+")]
    unknown = [n for n in names if n not in registry]
    if unknown or not all(names):
        raise EgptError(f"unknown strategy {unknown[0] if unknown else expression!r}; run `egpt-speed strategies` to list them.")
    if len(set(names)) != len(names):
        raise EgptError(f"strategy {expression!r} names a part twice; list each part once.")
    parts = [registry[n](ctx) for n in names]
    check_overrides(expression, parts)
    if len(parts) == 1 and parts[0].decodes:
        return parts[0]
    decoders = [p for p in parts if p.decodes]
    lenders = [p for p in decoders if p.lends_target]
    loops = [p for p in decoders if not p.lends_target]
    if len(decoders) == 2 and len(lenders) == 1 and loops[0].accepts_lent_target:
        loops[0].lender = lenders[0]  # compile+speculative: the draft loop verifies on a static cache
        return ComposedStrategy(ctx, parts, loops[0])
    if len(decoders) == 2 and len(lenders) == 1:
        raise EgptError(f"{loops[0].name} cannot run on {lenders[0].name}'s static-cache target; "
                        f"run {loops[0].name} alone, or compose {lenders[0].name} with one of "
                        f"{', '.join(sorted(n for n, c in registry.items() if c.accepts_lent_target))}.")
    if len(decoders) > 1:
        raise EgptError(f"{expression!r} combines two decoding loops ({decoders[0].name}, {decoders[1].name}); compose at most one with preparers.")
    decoder = decoders[0] if decoders else registry["baseline"](ctx)
    return ComposedStrategy(ctx, parts, decoder)
