"""EventGPT's frame rendering as torch ops on any device, pixel-identical to the reference per-event loop.

All frames of a clip are rendered by one `scatter_reduce(amax)` over the event order: each event
carries `2 * order + polarity`, so the per-pixel maximum is the last event there and its polarity.
"""

from __future__ import annotations

import numpy as np
import torch

from egpt_speed.events import EventStream, check_frame_size, split_equal_count

WHITE, BLUE, RED = 0, 1, 2  # pixel codes: untouched, last event polarity 0, last event polarity 1


def events_to_device(stream: EventStream, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, p cross to the device in their stored dtypes (5 bytes/event for EventGPT's uint16/uint8) → [N] each."""
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
                 for a in (stream.x, stream.y, stream.p))


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
