"""Host → device copies that do not stall the host: one reusable buffer, page-locked on CUDA.

A copy from pageable memory makes CUDA synchronise the stream first; from a pinned buffer it is
queued like a kernel. The buffer is rewritten only after its previous copy has read it (an event,
almost always already passed). Serves the speculative loop's token ids and tree paths
(static_decode.HostStaging) and Stage 2's event arrays (render_torch.Staging).
"""

from __future__ import annotations

import torch


class PinnedStaging:
    """A growable uint8 host buffer; `reserve` hands out a writable view, `send` queues its copy."""

    def __init__(self, pinned: bool, capacity: int = 0):
        self.pinned = pinned
        self.buffer: torch.Tensor | None = self._allocate(capacity) if capacity else None  # [capacity] uint8
        self.copied: torch.cuda.Event | None = None

    def reserve(self, nbytes: int) -> torch.Tensor:
        """A [nbytes] uint8 view of the buffer, safe to write: the previous copy out of it has finished."""
        if self.copied is not None:
            self.copied.synchronize()
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = self._allocate(max(nbytes, 2 * (self.buffer.numel() if self.buffer is not None else 0)))
        return self.buffer[:nbytes]

    def send(self, host: torch.Tensor, out: torch.Tensor) -> None:
        """Copy `host` (a view from `reserve`) into `out`; asynchronous from pinned memory on CUDA."""
        out.copy_(host, non_blocking=self.pinned)
        if out.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
