"""Shared fixtures: a private cache dir, the tiny tokenizer, a tiny synthetic dataset, and the in-process model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # `import helpers` and `from tests import helpers` both work
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from helpers import make_sp_tokenizer, make_tiny_eventgpt  # noqa: E402

SMALL_CLIPS = dict(width=64, height=48, num_events=2000, num_objects=3)


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

    def load(spec, dtype, device, vision_tower=None):
        model = make_tiny_eventgpt(0, tokenizer=sp_tokenizer).to(dtype=dtype)
        built.append(model)
        return model

    monkeypatch.setattr("egpt_speed.baselines.runner.load_model", load)
    return built
