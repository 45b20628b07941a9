"""`flex`: the LLM's attention as PyTorch FlexAttention with a block-sparse mask (egpt_speed.flex).

A preparer, meant for the static-cache decoder: `flex+compile`, `flex+compile+eagle-tree`. The engine turns its
dense mask into a BlockMask, so the unused cache slots are skipped, the filled prefix runs unmasked and only the
blocks holding a draft tree are masked; compiled, inductor emits FlexAttention's Triton kernels (flex decoding
for few queries). Eager (the CPU) runs FlexAttention's reference implementation. Batch 1, boolean masks only;
the CLIP tower keeps its attention. What the H200 measured (benchmarks/results/issue11_h200_20261203_s8, _s9): the
7B compiled step 5.070–5.128 ms a token against SDPA's 5.03–5.06; the 7B tree verify 1.28 / 1.41 / 4.35x a step for
17 / 33 / 65 rows, against SDPA's 1.24 / 1.32 / 1.27x (the flex kernel takes 26.6 us a layer at 33 rows, like
cuDNN's masked kernel, and 490 us at 65). With `tiny`'s 9 query heads on 3 KV heads inductor cannot use its decoding
kernel (a power-of-two group only) and the float32 attention is 4–11x slower than SDPA. Kept for comparison runs
and newer torch releases: on torch 2.11 it pays nowhere.
"""

from __future__ import annotations

from egpt_speed.attention import set_llm_attention
from egpt_speed.flex import BLOCK, FLEX, register_flex
from egpt_speed.static_decode import resolve_compile_mode
from egpt_speed.strategies.preparers import AttentionPreparer
from egpt_speed.strategies.registry import Strategy, register


@register
class FlexAttention(AttentionPreparer, Strategy):
    name = "flex"
    summary = "LLM attention = PyTorch FlexAttention with a block-sparse mask over the static cache (flex+compile); CLIP tower unchanged"
    attn_implementation = FLEX

    def unavailable_reason(self) -> str | None:
        compiled = resolve_compile_mode(self.ctx.options.get("compile_mode"), self.ctx.device) is not None
        if self.ctx.device.type == "cpu" and compiled:  # torch 2.13: NoValidChoicesError while lowering flex
            return "inductor cannot compile FlexAttention on the CPU; drop --compile-mode here (flex runs eager on the CPU)."
        return None

    def install(self, model) -> None:
        set_llm_attention(model.llm, register_flex())

    def extra_settings(self) -> dict:
        return {"flex_block": BLOCK}
