"""Clocks for the runner: device-synchronised wall time and per-region peak memory.

Timing lives here and in the runner only; strategies report counters, never times, except
through the `Clock` the runner hands them (a first-token mark for TTFT, draft/verify splits).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

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

    `begin`, `mark_first_token` and `end` synchronise the device once each. `phase` never does on
    CUDA: it records two CUDA events on the current stream, and the events are read (one sync) the
    first time `phases_ms` is read, after decoding; so phases cost no host stall and let the host
    queue the next phase while the device works. A phase's time is then the device timeline between
    its two events (idle gaps included). On the CPU phases keep perf_counter.
    """

    device: torch.device
    start: float = 0.0
    first_token: float | None = None
    enabled: bool = True
    _totals: dict[str, float] = field(default_factory=dict, repr=False)
    _pending: list[tuple[str, "torch.cuda.Event", "torch.cuda.Event"]] = field(default_factory=list, repr=False)

    def begin(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def mark_first_token(self) -> None:
        if self.first_token is None:
            synchronize(self.device)
            self.first_token = time.perf_counter()

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    @property
    def phases_ms(self) -> dict[str, float]:
        """Total ms per phase name; reads the recorded CUDA events (waits for the last one) on first use."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, stop in self._pending:
                self._add(name, start.elapsed_time(stop))
            self._pending.clear()
        return self._totals

    def _add(self, name: str, ms: float) -> None:
        self._totals[name] = self._totals.get(name, 0.0) + ms

    def end(self) -> tuple[float, float]:
        """Returns (prefill_ms, decode_ms)."""
        synchronize(self.device)
        stop = time.perf_counter()
        first = self.first_token if self.first_token is not None else stop
        return (first - self.start) * 1e3, (stop - first) * 1e3


class _Phase:
    def __init__(self, clock: Clock, name: str):
        self.clock, self.name, self._start = clock, name, 0.0
        self._events = clock.enabled and clock.device.type == "cuda"

    def __enter__(self) -> None:
        if self._events:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self._events:
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self.clock._pending.append((self.name, self._start_event, stop))
        else:
            self.clock._add(self.name, (time.perf_counter() - self._start) * 1e3)


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


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside (collect() between samples, outside the timed stages).

    A full collection walks every tracked object of the process (transformers, torch, the models' modules):
    a 2-core CPU `compare baseline compile compile+eagle` on tiny ran 7 of them, up to 255 ms each, at
    whatever moment an allocation crossed the threshold, i.e. inside a timed stage. Frozen first, the
    loaded process is never walked again, so the per-sample collect() only looks at what samples made.
    """
    enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def collect_between_samples() -> None:
    """The collection a paused collector owes: untimed, after a sample's records are written."""
    gc.collect()
