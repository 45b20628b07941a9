"""Stage 2's image half on any torch device, bit-exact to transformers' PIL CLIP processor.

The CLIP-336 processor resizes with PIL's bicubic filter (shortest edge → S), centre-crops S×S,
rescales by 1/255 and normalises. PIL resamples separably in 8-bit fixed point (22 fractional bits,
rounded and clipped to uint8 after each pass); `resize_crop` runs the same integer arithmetic with
the same coefficients as tensor ops, computing only the cropped pixels, so its output equals PIL's.
Rescale + normalise of a uint8 value is a 256-entry float32 table built with the processor's own
numpy arithmetic. A processor configured otherwise (another filter, padding) is refused.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from egpt_speed.errors import EgptError
from egpt_speed.events import EventStream
from egpt_speed.render_torch import codes_to_planar, events_to_device, render_codes

Preprocess = Literal["device", "cpu"]
PREPROCESS_MODES = ("device", "cpu")
PRECISION_BITS = 22  # PIL's Resample.c: 32 - 8 - 2
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ClipSpec:
    """What the CLIP processor does, read from it once."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def check_preprocess(preprocess: str) -> Preprocess:
    if preprocess not in PREPROCESS_MODES:
        raise EgptError(f"--preprocess {preprocess!r} is not one of {', '.join(PREPROCESS_MODES)}; pick one.")
    return preprocess  # type: ignore[return-value]


def clip_spec(processor) -> ClipSpec:
    """The processor's settings, or EgptError when it does something `resize_crop` does not reproduce."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    edge = _get(size, "shortest_edge")
    crop_h, crop_w = _get(crop, "height"), _get(crop, "width")
    supported = (
        getattr(processor, "do_resize", False) and getattr(processor, "do_center_crop", False)
        and getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)
        and not getattr(processor, "do_pad", False) and int(getattr(processor, "resample", -1)) == BICUBIC
        and edge and crop_h and crop_w and crop_h <= edge and crop_w <= edge and not _get(size, "longest_edge")
    )
    if not supported:
        raise EgptError(
            f"--preprocess device reproduces CLIP's standard processor (bicubic shortest-edge resize, centre crop, "
            f"rescale, normalise); {type(processor).__name__} is configured otherwise, so use --preprocess cpu."
        )
    mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    return ClipSpec(int(edge), int(crop_h), int(crop_w), float(processor.rescale_factor), mean, std)


def _get(size: object, key: str) -> int | None:
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


# ---------------------------------------------------------------- PIL's bicubic coefficients


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def _taps(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for outputs first..first+count-1.

    → (source index [count, K] int64, clamped in range; fixed-point weight [count, K] int64, 0 past each tap list).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(first, first + count) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero, as astype
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.arange(ksize)
    valid = k[None, :] < xmax[:, None]
    w = np.where(valid, _bicubic((k[None, :] + xmin[:, None] - center[:, None] + 0.5) / filterscale), 0.0)
    total = np.zeros(count)
    for j in range(ksize):  # sequential sum, the C loop's rounding order
        total += w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.where(scaled < 0, scaled - 0.5, scaled + 0.5).astype(np.int64)
    index = np.minimum(xmin[:, None] + k[None, :], in_size - 1)
    return index, np.where(valid, fixed, 0)


@functools.lru_cache(maxsize=256)
def _device_taps(in_size: int, out_size: int, first: int, count: int, device: torch.device):
    index, weight = _taps(in_size, out_size, first, count)
    return torch.from_numpy(index).to(device), torch.from_numpy(weight).to(torch.int32).to(device)


def _pass(img: torch.Tensor, in_size: int, out_size: int, first: int, count: int, dim: int) -> torch.Tensor:
    """One separable pass along `dim` (-1 columns, -2 rows) of an int32 [..., H, W] image, rounded to uint8 values.

    All K taps in one gather, multiply and sum (exact: integer arithmetic, any order), not K kernel triples.
    """
    if in_size == out_size and first == 0 and count == in_size:
        return img  # PIL skips a pass whose size does not change
    index, weight = _device_taps(in_size, out_size, first, count, img.device)  # [count, K] each
    taps = index.shape[1]
    gathered = img.index_select(dim, index.flatten())  # count * K along dim
    if dim == -1:
        acc = (gathered.view(*img.shape[:-1], count, taps) * weight).sum(-1)
    else:
        acc = (gathered.view(*img.shape[:-2], count, taps, img.shape[-1]) * weight.unsqueeze(-1)).sum(-2)
    return ((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255).to(torch.int32)


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' shortest-edge rule (the long side truncated, not rounded)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def resize_crop(img: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """[..., 3, H, W] uint8 → [..., 3, crop_h, crop_w] int32 in 0..255: PIL bicubic resize + centre crop, exactly."""
    height, width = img.shape[-2:]
    new_h, new_w = resized_size(height, width, spec.shortest_edge)
    top, left = (new_h - spec.crop_height) // 2, (new_w - spec.crop_width) // 2
    out = _pass(img.to(torch.int32), width, new_w, left, spec.crop_width, dim=-1)
    return _pass(out, height, new_h, top, spec.crop_height, dim=-2)


@functools.lru_cache(maxsize=16)
def _normalise_table(spec: ClipSpec, device: torch.device) -> torch.Tensor:
    # transformers' rescale: float64 multiply then float32; normalize: float32 (x - mean) / std.
    values = (np.arange(256, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
    mean, std = np.array(spec.mean, dtype=np.float32), np.array(spec.std, dtype=np.float32)
    table = (values[None, :] - mean[:, None]) / std[:, None]  # [3, 256]
    return torch.from_numpy(table.astype(np.float32)).to(device)


def normalise(pixels: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """[T, 3, S, S] integer 0..255 → float32 CLIP-normalised."""
    table = _normalise_table(spec, pixels.device).flatten()  # [3 * 256]
    channel = torch.arange(0, 3 * 256, 256, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return table.take((pixels + channel).long())


def events_pixel_values(stream: EventStream, n_frames: int, spec: ClipSpec, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """Render + CLIP-process a clip on `device` → [T, 3, S, S] in `dtype` (what Stage 3 reads)."""
    x, y, p = events_to_device(stream, device)
    return normalise(resize_crop_frames([codes_to_planar(c) for c in render_codes(x, y, p, n_frames)], spec),
                     spec).to(dtype)


def resize_crop_frames(frames: list[torch.Tensor], spec: ClipSpec) -> torch.Tensor:
    """[3, H_i, W_i] uint8 frames → [T, 3, crop_h, crop_w] int32; frames of one size are resized as one batch."""
    out: list[torch.Tensor | None] = [None] * len(frames)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, frame in enumerate(frames):
        by_size.setdefault(tuple(frame.shape[-2:]), []).append(i)
    for members in by_size.values():
        crops = resize_crop(torch.stack([frames[i] for i in members]), spec)  # [F, 3, S, S]
        for i, crop in zip(members, crops):
            out[i] = crop
    return torch.stack(out)


def frames_pixel_values(frames: list[np.ndarray], spec: ClipSpec, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """Pre-rendered [H, W, 3] uint8 frames (png source) → [T, 3, S, S] in `dtype` on `device`."""
    planar = [torch.from_numpy(f).to(device, non_blocking=True).permute(2, 0, 1) for f in frames]
    return normalise(resize_crop_frames(planar, spec), spec).to(dtype)


def max_pixel_diff(device_values: torch.Tensor, cpu_values: torch.Tensor) -> float:
    """Largest |device − cpu| over all pixel values (normalised units), compared in float32 on the CPU."""
    return float((device_values.float().cpu() - cpu_values.float().cpu()).abs().max())
