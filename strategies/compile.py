"""`compile`: gpt-fast-style greedy decoding — static KV cache, one prefill, a CUDA-graph-captured decode step.

The engine is `egpt_speed.static_decode.StaticEngine`. On CUDA the one-token step is compiled by
inductor (fused elementwise kernels, autotuned Triton GEMVs) and captured once as a CUDA graph
(first sample, reported as `compile_ms`), then replayed per token; on the CPU the same
static-cache path runs uncompiled and uncaptured (`cuda_graph: false` in settings and metrics).

`--compile-mode` (H100, 7B bf16, 623-token prefix, measured 2026-11-24):
  max-autotune-no-cudagraphs (CUDA default)  5.46–5.60 ms/token, ~100–115 s one-time compile
  default                                    6.33–6.43 ms/token,  ~39–46 s
  none (capture the eager step)              8.29 ms/token,  ~0.1 s
  reduce-overhead                            torch.compile's own CUDA graphs instead of ours
`--coordinate-descent` (egpt_speed.inductor_tuning, opt-in; H200, synthetic-7b bf16, compile mode default, 2026-12-03):
  off 5.024 ms/token, on 4.302 in one run and 4.999 in the next (the tuner's picks vary); with `fused` 4.545 off, 5.147 on
`eos_every` (a RunContext option, no CLI flag): tokens between EOS checks (default 1, see
static_decode.DEFAULT_EOS_EVERY). `--draft-compile` (compile+eagle, compile+eagle-tree): the captured
drafter's bodies compiled by inductor before capture; off by default (not yet timed on a GPU).
"""

from __future__ import annotations

from egpt_speed.decoding import eos_ids
from egpt_speed.errors import EgptError
from egpt_speed.inductor_tuning import decode_inductor_config
from egpt_speed.static_decode import DEFAULT_EOS_EVERY, StaticEngine, resolve_compile_mode
from egpt_speed.strategies.registry import Strategy, register


@register
class Compile(Strategy):
    name = "compile"
    summary = "static KV cache + CUDA-graph decode step (gpt-fast style), greedy argmax on the device; CPU: uncaptured"

    def _compile_mode(self) -> str | None:
        return resolve_compile_mode(self.ctx.options.get("compile_mode"), self.ctx.device)

    def _draft_compile(self) -> str | None:
        """--draft-compile: inductor for the captured drafter's bodies (off by default until measured on a GPU)."""
        mode = self.ctx.options.get("draft_compile")
        return None if mode in (None, "", "none") else str(mode)

    def _eos_every(self) -> int:
        value = int(self.ctx.options.get("eos_every") or DEFAULT_EOS_EVERY)
        if value < 1:
            raise EgptError("--option eos_every must be at least 1.")
        return value

    def prepare(self, model) -> None:
        # torchao's settings for int8wo/int4wo+compile, else coordinate-descent tuning if asked for
        compiled = self._compile_mode() is not None
        self.inductor_config = decode_inductor_config(model.llm, self.ctx.options.get("coordinate_descent")) if compiled else {}
        self.engine = StaticEngine(model.llm, compile_mode=self._compile_mode(), inductor_config=self.inductor_config)

    def decode(self, model, request, clock):
        if request.settings.do_sample:
            raise EgptError("the compile strategy decodes greedily only; drop --do-sample or use baseline for sampling.")
        embeds = model.splice(request.prompt_ids, request.event_features)  # [1, L', H]
        return self.engine.generate(embeds, request.settings.max_new_tokens, eos_ids(model), clock, self._eos_every())

    def settings(self) -> dict:
        cuda_graph = self.ctx.device.type == "cuda"
        return {"cuda_graph": cuda_graph, "compile_mode": self._compile_mode(), "eos_every": self._eos_every(),
                "draft_compile": self._draft_compile(), "inductor_config": getattr(self, "inductor_config", None) or None,
                "static_cache": True,
                "note": None if cuda_graph else "CPU: static-cache decode without graph capture (nothing to capture)"}

    # ---- compile+speculative: composed with a speculative decoder, compile lends it a StaticTarget ----

    lends_target = True

    def lend_target(self, model, max_seq: int, gamma: int):
        """A StaticTarget on this strategy's engine with room for max_seq positions (reused across samples)."""
        from egpt_speed.static_decode import StaticTarget

        target = getattr(self, "_target", None)
        if target is None or target.width != gamma + 1:
            if target is not None:
                target.discard()
            target = self._target = StaticTarget(self.engine, gamma)
        drafter = getattr(self, "_drafter", None)
        target.setup(max_seq, tree_nodes=drafter.max_nodes if drafter is not None else 0)
        return target

    def lend_drafter(self, head, model, prefix_embeds, settings, gamma: int, tree=None):
        """A captured EAGLE drafter (static_draft.StaticEagleDrafter) for one sample, reused across
        samples; None when sampling (it drafts greedily: the eager EagleProposer serves sampled runs).

        prefix_embeds: [1, L, H]; tree: the decoder's TreeShape, or None for chains."""
        if settings.do_sample:
            return None
        from egpt_speed.static_draft import StaticEagleDrafter
        from egpt_speed.tree import TreeShape

        shape = tree or TreeShape()
        key = (id(head), gamma, shape.topk, shape.max_nodes)
        if getattr(self, "_drafter_key", None) != key:
            self._drafter = StaticEagleDrafter(head, model.llm, gamma, shape.topk, shape.max_nodes,
                                               compile_mode=self._draft_compile())
            self._drafter_key = key
        return self._drafter.begin(prefix_embeds, settings.max_new_tokens)
