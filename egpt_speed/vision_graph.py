"""Stage 3's fixed-shape forward (CLIP tower → projector → adaptor) without per-kernel host overhead.

5 frames × 577 tokens through ViT-L/14 is ~1.7 TFLOP, a millisecond or two of H200 work, yet the
eager module tree launches ~600 kernels from Python. `--vision-mode` picks how the forward runs:
`graph` replays it as one CUDA graph per input shape (on the CPU the same buffers and code run
uncaptured), `compile` hands it to torch.compile, `eager` calls it as is; `auto` is `graph` on
CUDA and `eager` elsewhere. The graph is captured inside inference mode, so only Stage 3 uses it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from egpt_speed.errors import EgptError
from egpt_speed.static_decode import capture_cuda_graph

VISION_MODES = ("auto", "eager", "graph", "compile")
CAPTURE_WARMUP = 2  # side-stream runs before capture (cuBLAS handles, SDPA kernel choice)


def check_vision_mode(mode: str) -> str:
    if mode not in VISION_MODES:
        raise EgptError(f"--vision-mode {mode!r} is not one of {', '.join(VISION_MODES)}; pick one.")
    return mode


def resolve_vision_mode(mode: str, device: torch.device) -> str:
    """auto → a CUDA graph on CUDA, the eager forward elsewhere."""
    if check_vision_mode(mode) == "auto":
        return "graph" if device.type == "cuda" else "eager"
    return mode


@dataclass
class _Captured:
    """One input shape's static buffers and, on CUDA, its graph."""

    pixel_values: torch.Tensor  # [T, 3, S, S] static input
    features: torch.Tensor  # [T, P, H] static output
    graph: torch.cuda.CUDAGraph | None


class FrameEncoder:
    """`encode_frames` run per `mode`; a new input shape (another frame count or batch) captures once more."""

    def __init__(self, encode_frames: Callable[[torch.Tensor], torch.Tensor], mode: str, device: torch.device):
        self.mode, self.device = mode, device
        self.body = torch.compile(encode_frames, dynamic=False) if mode == "compile" else encode_frames
        self.captured: dict[tuple, _Captured] = {}
        self.fallback: str | None = None  # why a CUDA graph could not be captured, if it could not

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [T, 3, S, S] → [T, P, H] (a fresh tensor: the graph's output buffer is reused)."""
        if self.mode != "graph":
            return self.body(pixel_values)
        key = (tuple(pixel_values.shape), pixel_values.dtype)
        entry = self.captured.get(key) or self._capture(pixel_values)
        entry.pixel_values.copy_(pixel_values)
        if entry.graph is None:
            entry.features.copy_(self.body(entry.pixel_values))
        else:
            entry.graph.replay()
        return entry.features.clone()

    def _capture(self, pixel_values: torch.Tensor) -> _Captured:
        static_in = pixel_values.clone()
        out: dict[str, torch.Tensor] = {}

        def body() -> None:
            out["features"] = self.body(static_in)

        graph = self._try_capture(body) if self.device.type == "cuda" else None
        if graph is None:
            body()
        entry = _Captured(static_in, out["features"], graph)
        self.captured[(tuple(pixel_values.shape), pixel_values.dtype)] = entry
        return entry


    def _try_capture(self, body: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        """The graph, or None after a failed capture: the forward then runs uncaptured, and `fallback` says why."""
        try:
            return capture_cuda_graph(body, self.device, CAPTURE_WARMUP)
        except RuntimeError as error:  # an op the tower's transformers version runs that cannot be captured
            self.fallback = f"CUDA graph capture failed ({str(error).splitlines()[0][:200]}); Stage 3 ran uncaptured"
            warnings.warn(self.fallback, stacklevel=2)
            torch.cuda.synchronize(self.device)
            return None


def use_vision_mode(model, mode: str) -> str:
    """Give `model` its Stage-3 frame encoder for `mode` (resolved); returns the mode that runs.

    Only EventGPT's own stack is wrapped: a LLaVA family's `encode_frames` stays eager.
    """
    resolved = resolve_vision_mode(mode, model.device) if model.family == "eventgpt" else "eager"
    model.frame_encoder = FrameEncoder(model.encode_frames, resolved, model.device)
    return resolved


def encode_frames_fast(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[T, 3, S, S] → [T, P, H] through the model's frame encoder when it has one, else its eager forward."""
    encoder = getattr(model, "frame_encoder", None)
    return encoder(pixel_values) if encoder is not None else model.encode_frames(pixel_values)


def vision_facts(model) -> dict:
    """What Stage 3 runs with, for the result: the mode and the tower's attention implementation
    (its dtype is the result's `vision_dtype`)."""
    encoder = getattr(model, "frame_encoder", None)
    tower = getattr(model, "vision_tower", None)
    return {"vision_mode": encoder.mode if encoder is not None else "eager",
            "vision_attention": getattr(getattr(tower, "config", None), "_attn_implementation", None),
            "vision_graph_fallback": encoder.fallback if encoder is not None else None}
