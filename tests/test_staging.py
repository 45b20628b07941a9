"""Stage 2's host→device copy of the events (issue 13 item 2): one packed copy through a reused buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egpt_speed.render_torch import Staging


def arrays(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1280, n).astype(np.uint16), rng.integers(0, 720, n).astype(np.int32),
            rng.integers(0, 2, n).astype(np.uint8), rng.integers(-5, 5, n).astype(np.int64)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="page-locked staging needs a CUDA device"))])
def test_packed_arrays_arrive_intact_and_do_not_alias_the_reused_buffer(device):
    staging = Staging(pinned=device == "cuda")
    first_in = arrays(1001, 0)  # odd lengths: offsets must stay aligned for every dtype
    first = staging.to_device(first_in, torch.device(device))
    capacity = staging.buffer.numel()
    second_in = arrays(5003, 1)  # larger: the buffer grows
    second = staging.to_device(second_in, torch.device(device))
    assert staging.buffer.numel() > capacity
    for got, want in zip(first + second, first_in + second_in):
        assert got.device.type == device and got.dtype == torch.from_numpy(want).dtype
        assert np.array_equal(got.cpu().numpy(), want)
