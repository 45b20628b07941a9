"""`--device` and `--dtype` names → torch objects, checked before anything loads."""

from __future__ import annotations

import torch

from egpt_speed.errors import EgptError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`auto` is bfloat16 (EventGPT's own dtype) on CUDA and float32 (exact, fast) on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise EgptError(f"--dtype {name!r} is not supported; use auto or one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EgptError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if name not in ("cuda", "cpu") and not name.startswith("cuda:"):
        raise EgptError(f"--device {name!r} is not supported; use auto, cuda or cpu.")
    return torch.device(name)
