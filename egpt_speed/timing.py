"""Clocks for the runner: device-synchronised wall time and per-region peak memory.

Timing lives here and in the runner only; strategies report counters, never times, except
through the `Clock` the runner hands them (a first-token mark for TTFT, draft/verify splits).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Region:
    """One timed region: wall ms between two synchronised clock reads, and its peak device memory."""

    ms: float = 0.0
    peak_bytes: int | None = None  # device-wide peak (every loaded model included)
    working_bytes: int | None = None  # peak above what was allocated when the region began


class TimedRegion:
    """`with TimedRegion(device) as region:` syncs before and after, reads perf_counter, tracks peak memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.region = Region()
        self._start = 0.0

    def __enter__(self) -> Region:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
        self._start = time.perf_counter()
        return self.region

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.region.ms = (time.perf_counter() - self._start) * 1e3
        if self.device.type == "cuda":
            self.region.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.region.working_bytes = self.region.peak_bytes - self._start_bytes


@dataclass
class Clock:
    """Handed to a strategy's decode: it marks the first new token (TTFT) and may time sub-phases.

    Each mark synchronises the device once; strategies call `mark_first_token` exactly once and
    `phase` around whole draft/verify blocks, never per token inside a graph-captured loop.
    """

    device: torch.device
    start: float = 0.0
    first_token: float | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    enabled: bool = True

    def begin(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def mark_first_token(self) -> None:
        if self.first_token is None:
            synchronize(self.device)
            self.first_token = time.perf_counter()

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def end(self) -> tuple[float, float]:
        """Returns (prefill_ms, decode_ms)."""
        synchronize(self.device)
        stop = time.perf_counter()
        first = self.first_token if self.first_token is not None else stop
        return (first - self.start) * 1e3, (stop - first) * 1e3


class _Phase:
    def __init__(self, clock: Clock, name: str):
        self.clock, self.name, self._start = clock, name, 0.0

    def __enter__(self) -> None:
        if self.clock.enabled:
            synchronize(self.clock.device)
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.clock.enabled:
            synchronize(self.clock.device)
        elapsed = (time.perf_counter() - self._start) * 1e3
        self.clock.phases_ms[self.name] = self.clock.phases_ms.get(self.name, 0.0) + elapsed


def measure_copy_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    numel = megabytes * (1 << 20) // 4
    source = torch.rand(numel, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    samples = []
    for _ in range(repeats):
        with TimedRegion(device) as region:
            target.copy_(source)
        samples.append(2 * source.numel() * 4 / (region.ms / 1e3))
    samples.sort()
    return samples[len(samples) // 2]


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Benchmarks' micro-timing: `warmup` untimed calls, then the median of `repeats` synchronised calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        with TimedRegion(device) as region:
            fn()
        samples.append(region.ms)
    return statistics.median(samples)
