"""`speculative`: a draft model proposes γ tokens, the multimodal target verifies them in one forward."""

from __future__ import annotations

from egpt_speed.cross_modal import draft_prefix
from egpt_speed.decoding import eos_ids
from egpt_speed.drafts import Draft, load_draft
from egpt_speed.proposers import CausalLMProposer, EagleProposer, Proposer
from egpt_speed.fused_step import fused_chain_decode, resolve_fused_step
from egpt_speed.speculation import speculative_decode
from egpt_speed.static_draft import StaticEagleDrafter
from egpt_speed.tree import TreeShape
from egpt_speed.strategies.registry import Strategy, register


@register
class Speculative(Strategy):
    name = "speculative"
    accepts_lent_target = True
    summary = ("draft (--draft: EAGLE head dir, causal LM, EventGPT / LLaVA / Video-LLaVA (cross-modal: its own view), "
               "or target) proposes γ tokens, one target forward verifies; greedy lossless")

    def prepare(self, model) -> None:
        self.draft: Draft = load_draft(self.ctx.draft_spec, model, self.ctx.model_spec, self.ctx.device, self.ctx.dtype)

    def proposer_for(self, model, request, prefix_embeds) -> Proposer:
        if self.draft.head is not None:
            # a compiled lender drafts with the head captured on a static cache (greedy); else the eager head
            lent = self.lender.lend_drafter(self.draft.head, model, prefix_embeds, request.settings, self.ctx.gamma,
                                            self.tree_shape()) if self.lender is not None else None
            return lent or EagleProposer(self.draft.head, model.llm, prefix_embeds)
        if not self.draft.multimodal:
            return CausalLMProposer(self.draft.llm, prefix_ids=request.text_ids)
        if self.draft.own_stages is not None:
            # a draft of another family sees its own modality: its Stages 1–3 run here, before the target's
            # prefill, so they are charged to Stage 4 (and TTFT); the runner's SampleRequest names the sample
            own = draft_prefix(self.draft.own_stages, getattr(request, "spec", None))
            self._draft_stage_ms = own.stage_ms
            return CausalLMProposer(self.draft.llm, prefix_embeds=own.embeds, token_map=self.draft.token_map)
        if self.draft.eventgpt is not None:
            # an EventGPT draft of the same width reuses the target's Stage-3 features
            prefix_embeds = self.draft.eventgpt.splice(request.prompt_ids, request.event_features)
        return CausalLMProposer(self.draft.llm, prefix_embeds=prefix_embeds)

    def decode(self, model, request, clock):
        self._draft_stage_ms: dict = {}
        prefix_embeds = model.splice(request.prompt_ids, request.event_features)
        proposer = self.proposer_for(model, request, prefix_embeds)
        target = self.verify_target(model, prefix_embeds, request.settings)
        if getattr(proposer, "aux_layers", None):  # an EAGLE-3 head drafts from three target layers' inputs
            target.capture_layers(proposer.aux_layers)
        if self.fused_step() and isinstance(proposer, StaticEagleDrafter):
            result = fused_chain_decode(target, proposer, prefix_embeds, request.settings, self.ctx.gamma, eos_ids(model), clock,
                                        tree=self.tree_shape() is not None)
        else:
            result = speculative_decode(target, prefix_embeds, proposer, request.settings, self.ctx.gamma, eos_ids(model),
                                        clock, adaptive_gamma=bool(self.ctx.options.get("adaptive_gamma")),
                                        tree=self.tree_shape())
        # compile+eagle drafts with a graph-captured head when greedy and with the eager head when sampling:
        # each sample records which one it measured
        result.metrics["drafter"] = type(proposer).__name__
        result.metrics.update(self._draft_stage_ms)
        engine = getattr(target, "engine", None)  # a static target: a prompt of a new PREFILL_BUCKET was captured here
        if engine is not None and engine.prefill_capture_ms:
            result.metrics["prefill_capture_ms"] = engine.prefill_capture_ms
        return result

    def fused_step(self) -> bool:
        """--fused-step: one graph per step (fused_step.py), for an EAGLE head's captured drafter on a lent target
        only (an LM draft keeps the loop, and its settings must say so: the report reads them)."""
        draft = getattr(self, "draft", None)
        wanted = resolve_fused_step(self.ctx.options.get("fused_step"), self.ctx.device, False, self.ctx.options)
        return wanted and self.lender is not None and (draft is None or draft.head is not None)

    def tree_shape(self) -> TreeShape | None:
        """A draft tree's shape for tree-drafting subclasses (eagle-tree); None drafts a chain."""
        return None

    def settings(self) -> dict:
        draft = getattr(self, "draft", None)
        return {"gamma": self.ctx.gamma, "draft": draft.name if draft else self.ctx.draft_spec,
                "draft_kind": ("eagle-head" if draft.head is not None else "lm") if draft else None,
                "draft_sees_events": draft.multimodal if draft else None,
                "draft_family": draft.family if draft else None,
                "draft_own_stages": draft.own_stages is not None if draft else None,
                "draft_mapped_out_tokens": list(draft.token_map.mapped_out) if draft and draft.token_map else None,
                "adaptive_gamma": bool(self.ctx.options.get("adaptive_gamma")), "fused_step": self.fused_step()}
