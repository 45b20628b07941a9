"""EventGPT's frame rendering as torch ops on any device, pixel-identical to the reference per-event loop.

All frames of a clip are rendered by one `scatter_reduce(amax)` over the event order: each event
carries `2 * order + polarity`, so the per-pixel maximum is the last event there and its polarity.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from egpt_speed.events import EventStream, check_frame_size, split_equal_count
from egpt_speed.host_staging import PinnedStaging

WHITE, BLUE, RED = 0, 1, 2  # pixel codes: untouched, last event polarity 0, last event polarity 1


ALIGN = 8  # bytes: each array's offset in the staging buffer, so every dtype can view its slice


class Staging:
    """Arrays packed into one reusable host buffer (host_staging.PinnedStaging, page-locked when CUDA is
    there) cross to the device in one asynchronous copy."""

    def __init__(self, pinned: bool):
        self.host = PinnedStaging(pinned)

    @property
    def buffer(self) -> torch.Tensor | None:
        """The reused host buffer ([capacity] uint8)."""
        return self.host.buffer

    def to_device(self, arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
        """1-D arrays → tensors on `device` in their dtypes (fresh device memory, never the staging buffer)."""
        offsets = np.cumsum([0] + [-(-a.nbytes // ALIGN) * ALIGN for a in arrays]).tolist()
        packed_host = self.host.reserve(offsets[-1])
        host = packed_host.numpy()
        for array, start in zip(arrays, offsets):
            host[start:start + array.nbytes] = np.ascontiguousarray(array).view(np.uint8)
        packed = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
        self.host.send(packed_host, packed)
        return [packed[start:start + a.nbytes].view(torch.from_numpy(a[:0]).dtype) for a, start in zip(arrays, offsets)]


@functools.lru_cache(maxsize=None)
def staging_for(device: torch.device) -> Staging:
    """One staging buffer per device, reused by every sample Stage 2 sends there."""
    return Staging(pinned=device.type == "cuda")


def events_to_device(stream: EventStream, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, p cross to the device in their stored dtypes (5 bytes/event for EventGPT's uint16/uint8) → [N] each:
    on CUDA packed into one page-locked buffer and one copy, on the CPU as they are."""
    arrays = [stream.x, stream.y, stream.p]
    if device.type != "cuda":
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return tuple(staging_for(device).to_device(arrays, device))


def render_codes(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, n_frames: int) -> list[torch.Tensor]:
    """Pixel codes (WHITE/BLUE/RED) of the n equal-count frames: [max y + 1, max x + 1] uint8 each.

    x, y, p: [N] integer tensors on one device; frame sizes are per chunk, like the reference.
    """
    bounds = split_equal_count(int(x.shape[0]), n_frames)
    xs, ys = x.to(torch.int64), y.to(torch.int64)
    maxima = torch.stack([torch.stack([ys[a:b].amax(), xs[a:b].amax()]) for a, b in bounds])
    sizes = [(h + 1, w + 1) for h, w in maxima.tolist()]  # the one host sync: frame sizes set allocations
    for height, width in sizes:
        check_frame_size(height, width)
    areas = [h * w for h, w in sizes]
    offsets = np.concatenate([[0], np.cumsum(areas)[:-1]]).tolist()
    pixel = torch.empty_like(xs)  # [N] index into all frames' pixels, frame after frame
    for (a, b), (_, width), offset in zip(bounds, sizes, offsets):
        torch.add(xs[a:b], ys[a:b], alpha=width, out=pixel[a:b]).add_(offset)
    order = torch.arange(x.shape[0], device=x.device)
    last = torch.full((sum(areas),), -1, dtype=torch.int64, device=x.device)
    last.scatter_reduce_(0, pixel, order.mul_(2).add_(p != 0), reduce="amax")
    codes = torch.where(last >= 0, (last & 1) + 1, 0).to(torch.uint8)
    return [codes[o:o + n].view(h, w) for o, n, (h, w) in zip(offsets, areas, sizes)]


def codes_to_planar(codes: torch.Tensor) -> torch.Tensor:
    """[H, W] pixel codes → [3, H, W] uint8 RGB (white, blue (0, 0, 255), red (255, 0, 0))."""
    planes = (codes != BLUE, codes == WHITE, codes != RED)
    return torch.stack(planes).to(torch.uint8).mul_(255)


def render_frames_torch(stream: EventStream, n_frames: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The official rendering on `device`: n frames, [H, W, 3] uint8 each, equal to `events.render_frames`."""
    x, y, p = events_to_device(stream, torch.device(device))
    return [codes_to_planar(c).permute(1, 2, 0) for c in render_codes(x, y, p, n_frames)]
