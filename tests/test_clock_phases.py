"""timing.Clock phases: perf_counter on the CPU, CUDA events read once after decoding on CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from egpt_speed.timing import Clock

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_phases_accumulate_per_name():
    clock = Clock(torch.device("cpu"))
    for _ in range(3):
        with clock.phase("draft"):
            time.sleep(0.002)
        with clock.phase("verify"):
            pass
    assert clock.phases_ms["draft"] >= 6.0
    assert 0.0 <= clock.phases_ms["verify"] < clock.phases_ms["draft"]


@needs_cuda
def test_cuda_phases_are_events_resolved_on_read():
    device = torch.device("cuda")
    clock = Clock(device)
    a = torch.randn(2048, 2048, device=device)
    for _ in range(2):
        with clock.phase("verify"):
            for _ in range(5):
                a = a @ a / 2048  # device work the host does not wait for
    assert clock._pending and "verify" not in clock._totals  # nothing read back while decoding
    total = clock.phases_ms["verify"]
    assert total > 0.0 and not clock._pending
    assert clock.phases_ms["verify"] == total  # reading again adds nothing
