"""Shared fixtures: a private cache dir, the tiny tokenizer, a tiny synthetic dataset, and the in-process model."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # `import helpers` and `from tests import helpers` both work
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from helpers import make_sp_tokenizer, make_tiny_eventgpt  # noqa: E402

SMALL_CLIPS = dict(width=64, height=48, num_events=2000, num_objects=3)
OUR_MODULES = ("egpt_speed",)  # pyproject's filterwarnings turn deprecations raised here into errors
# Frames between a deprecated transformers `forward` and its caller: Module.__call__ and decorators.
DISPATCH_MODULES = ("torch.nn.modules.module", "torch.utils._contextlib", "transformers.utils.generic",
                    "transformers.utils.deprecation", "transformers.utils.output_capturing")


def _module_of(frame) -> str:
    return frame.f_globals.get("__name__", "")


def _ours(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in OUR_MODULES)


def deprecation_stacklevel(stacklevel: int) -> int:
    """The stacklevel naming the real caller of a deprecated API, counted from the caller of `warnings.warn`.

    transformers warns with stacklevel=2 from its deprecated-kwarg decorator, which names torch's
    Module.__call__ when our code calls `model(past_key_values=...)`. Past that dispatch the caller
    is our frame (→ re-attributed, so the pyproject filter fails the test) or a transformers frame
    (a deprecated call inside the library: left as it is, a warning).
    """
    frame, level = sys._getframe(2), 1  # 0: this, 1: the warn wrapper, 2: the caller of warnings.warn
    while frame is not None and level < stacklevel:
        frame, level = frame.f_back, level + 1
    while frame is not None and _module_of(frame).startswith(DISPATCH_MODULES):
        frame, level = frame.f_back, level + 1
    return level if frame is not None and _ours(_module_of(frame)) else stacklevel


@pytest.fixture(scope="session", autouse=True)
def deprecations_name_their_caller():
    """Route DeprecationWarning/FutureWarning through `deprecation_stacklevel` for the whole session."""
    original = warnings.warn

    def warn(message, category=None, stacklevel=1, *args, **kwargs):
        kind = type(message) if isinstance(message, Warning) else (category or UserWarning)
        if issubclass(kind, (DeprecationWarning, FutureWarning)):
            stacklevel = deprecation_stacklevel(stacklevel)
        return original(message, category, stacklevel + 1, *args, **kwargs)

    warnings.warn = warn
    yield
    warnings.warn = original


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Nothing a test runs writes to ~/.cache: the synthetic-data and model caches go to a temp dir."""
    cache = tmp_path_factory.mktemp("egpt-cache")
    previous = os.environ.get("EGPT_SPEED_CACHE")
    os.environ["EGPT_SPEED_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("EGPT_SPEED_CACHE", None)
    else:
        os.environ["EGPT_SPEED_CACHE"] = previous


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    return make_sp_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_tiny_dataset(root: Path, num_clips: int, seed: int = 0) -> Path:
    from egpt_speed.datasets import load_questions
    from egpt_speed.events import SyntheticClipConfig, write_synthetic_dataset

    return write_synthetic_dataset(root, num_clips, seed, SyntheticClipConfig(**SMALL_CLIPS), load_questions()[:5])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Six small synthetic clips (2,000 events, 64×48) in EventGPT's dataset layout."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "dataset", 6)


@pytest.fixture
def tiny_loader(monkeypatch, sp_tokenizer):
    """Make the runner load `make_tiny_eventgpt(seed=0)` whatever --model says; returns the built models."""
    built = []

    def load(spec, dtype, device, vision_tower=None, allow_tokenizer_mismatch=False):
        model = make_tiny_eventgpt(0, tokenizer=sp_tokenizer).to(dtype=dtype)
        built.append(model)
        return model

    monkeypatch.setattr("egpt_speed.baselines.runner.load_model", load)
    return built
