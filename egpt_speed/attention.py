"""Attention backends of the LLM: eager, sdpa, SDPA forced onto its FlashAttention kernel, flash_attention_2.

Only the LLM is switched (`PreTrainedModel.set_attn_implementation`, transformers 5.x); the CLIP
tower keeps its own setting, so Stage 3 is unchanged.

Forcing PyTorch SDPA onto FlashAttention is a registered transformers attention function (plus
its mask function) rather than a wrapper around `forward`, so it composes with any decoder:
- calls without a mask (prefill of a fresh cache, one-token decode steps) run the FlashAttention
  kernel through transformers' own `sdpa_attention_forward`;
- a multi-token step on a dynamic cache with no padding (a speculative verify) gets a
  lower-right causal `CausalBias` instead of a materialised mask — FlashAttention implements
  exactly that alignment, so verifying stays on the kernel;
- anything that needs a real mask (left-padded batches) cannot run on FlashAttention and raises
  one clear error instead of silently using another kernel.
"""

from __future__ import annotations

import torch

from egpt_speed.errors import EgptError

# No "flash" in the name: transformers treats every attn_implementation containing "flash" as the
# flash-attn package (unpadding, 2D masks). "sdpa" in it makes transformers run its SDPA checks.
FORCED_FLASH = "sdpa_forced_fa"
FLASH_MAX_HEAD_DIM = 256
HALF_DTYPES = (torch.float16, torch.bfloat16)


def set_llm_attention(llm, implementation: str) -> None:
    """Switch the LLM's attention implementation (only the LLM: it has no vision sub-config)."""
    try:
        llm.set_attn_implementation(implementation)
    except (ValueError, ImportError) as error:  # transformers' refusals for unknown/unsupported implementations
        raise EgptError(f"could not set the LLM's attn_implementation to {implementation!r} ({error}).") from None
    actual = llm.config._attn_implementation
    if actual != implementation:
        raise EgptError(f"transformers set the LLM's attention to {actual!r} instead of {implementation!r}; this model cannot use it.")


def attention_settings(model) -> dict:
    """What to record: the LLM's and the vision tower's attention implementations."""
    return {"attn_implementation": model.llm.config._attn_implementation,
            "vision_attn_implementation": getattr(model.vision_tower.config, "_attn_implementation", None)}


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def half_precision_cuda_reason(device: torch.device, dtype: torch.dtype, kernel: str) -> str | None:
    """None when `kernel` (a FlashAttention flavour) can run for this device and dtype, else why not."""
    if device.type != "cuda":
        return f"{kernel} runs on CUDA only (this run's device is {device.type}); use sdpa here."
    if dtype not in HALF_DTYPES:
        return (f"{kernel} takes float16 or bfloat16 only (this run is {str(dtype).replace('torch.', '')}); "
                "run with --dtype bfloat16.")
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
        return f"{kernel} needs a GPU of compute capability 8.0 or newer (Ampere, Hopper)."
    return None


def forced_flash_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    reason = half_precision_cuda_reason(device, dtype, "PyTorch's FlashAttention kernel")
    if reason is None and torch.cuda.is_available() and not torch.backends.cuda.is_flash_attention_available():
        return "this PyTorch build has no FlashAttention kernel; use sdpa."
    return reason


def check_flash_head_dim(config) -> None:
    size = head_dim(config)
    if size > FLASH_MAX_HEAD_DIM:
        raise EgptError(f"the LLM's head dim is {size}; FlashAttention handles at most {FLASH_MAX_HEAD_DIM}; use sdpa.")


# ---- SDPA forced onto FlashAttention ---------------------------------------------------------------

def lower_right_causal_mask(**kwargs):
    """transformers mask function: a `CausalBias` for a multi-token step on an unpadded dynamic cache, else `sdpa_mask`.

    transformers materialises a boolean mask whenever 1 < q_length < kv_length (it can only skip
    the mask for prefill or one-token steps); for a dynamic cache without padding that mask is the
    lower-right causal pattern, which SDPA's FlashAttention computes from `CausalBias` alone.
    """
    from torch.nn.attention.bias import causal_lower_right
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    q_length, kv_length = kwargs["q_length"], kwargs["kv_length"]
    padding = kwargs.get("attention_mask")  # [B, kv] 2D padding mask or None
    if (1 < q_length < kv_length and kwargs.get("allow_is_causal_skip", True) and kwargs.get("local_size") is None
            and kwargs.get("mask_function") is causal_mask_function and kwargs.get("kv_offset", 0) == 0
            and int(kwargs.get("q_offset", 0)) + q_length == kv_length  # a dynamic cache, not a static one
            and (padding is None or bool(padding.all()))):  # one host sync per forward, as transformers' own skip check
        return causal_lower_right(q_length, kv_length)
    return sdpa_mask(**kwargs)


def _check_flash_runs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> None:
    """Before a `CausalBias` call: PyTorch would quietly fall back to another kernel if flash cannot run."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    # is_causal=False as CausalBias itself checks it: with True, PyTorch refuses non-square causal calls it would
    # align top-left, while the lower-right call below is exactly what the kernel supports.
    if not can_use_flash_attention(SDPAParams(query, key, value, None, dropout, False, False), True):
        raise EgptError("sdpa-flash: PyTorch's FlashAttention kernel cannot run this attention call "
                        f"(q {tuple(query.shape)} {query.dtype} on {query.device}; see the warning above); use sdpa.")


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      enforce: bool = True, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. query [B, H, q, D], key/value [B, H_kv, kv, D] → ([B, q, H, D], None).

    enforce=True runs under `sdpa_kernel(FLASH_ATTENTION)` and refuses calls FlashAttention cannot
    take; enforce=False is the same arithmetic on any kernel (tests on the CPU check the masks with it).
    """
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import CausalBias
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if enforce and attention_mask is not None and not isinstance(attention_mask, CausalBias):
        raise EgptError("sdpa-flash: this forward needs an explicit attention mask (a left-padded batch or a static "
                        "KV cache), which PyTorch's FlashAttention kernel cannot take; use sdpa for it.")
    forced = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if enforce else contextlib.nullcontext()
    try:
        with forced:
            if isinstance(attention_mask, CausalBias):
                groups = getattr(module, "num_key_value_groups", 1)
                key, value = repeat_kv(key, groups), repeat_kv(value, groups)
                if enforce:
                    _check_flash_runs(query, key, value, dropout)
                output = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
                return output.transpose(1, 2).contiguous(), None
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
    except RuntimeError as error:
        if enforce and "No available kernel" in str(error):
            raise EgptError("sdpa-flash: PyTorch's FlashAttention kernel cannot run this attention call "
                            f"(q {tuple(query.shape)} {query.dtype}; PyTorch's warning above says why); use sdpa.") from None
        raise


def register_sdpa_variant(name: str = FORCED_FLASH, enforce: bool = True) -> str:
    """Register `name` as a transformers attention implementation (attention + mask function); returns it."""
    from transformers import AttentionInterface, AttentionMaskInterface

    def forward(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, enforce=enforce, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, lower_right_causal_mask)
    return name
