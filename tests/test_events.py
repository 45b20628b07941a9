import pickle
from pathlib import Path

import numpy as np
import torch
import pytest

from egpt_speed.errors import EgptError
from egpt_speed.events import (
    EventStream,
    SyntheticClipConfig,
    load_event_npy,
    load_png_frames,
    render_frame,
    render_frames,
    save_png,
    split_equal_count,
    synthesize_clip,
)


def reference_event_image(x, y, p):
    """EventGPT's original per-event loop, verbatim."""
    height, width = y.max() + 1, x.max() + 1
    img = np.ones((height, width, 3), dtype=np.uint8) * 255
    for x_, y_, p_ in zip(x, y, p):
        if p_ == 0:
            img[y_, x_] = [0, 0, 255]
        else:
            img[y_, x_] = [255, 0, 0]
    return img


def reference_frames(x, y, p, n):
    per = len(x) // n
    out = []
    for i in range(n):
        a, b = i * per, (len(x) if i == n - 1 else (i + 1) * per)
        out.append(reference_event_image(x[a:b], y[a:b], p[a:b]))
    return out


def small_stream(seed: int, n: int, width: int = 20, height: int = 15) -> EventStream:
    rng = np.random.default_rng(seed)
    return EventStream(
        x=rng.integers(0, width, n).astype(np.int32),
        y=rng.integers(0, height, n).astype(np.int32),
        t=np.arange(n, dtype=np.int64),
        p=rng.integers(0, 2, n).astype(np.uint8),
        meta={},
    )


def write_npy_dict(path: Path, record) -> Path:
    np.save(path, record, allow_pickle=True)
    return path


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("seed,n", [(0, 1000), (1, 1003), (2, 2999), (3, 7), (4, 5)])
@pytest.mark.parametrize("n_frames", [5, 1])
def test_render_frames_pixel_identical_to_reference(seed, n, n_frames):
    s = small_stream(seed, n)
    ours = render_frames(s, n_frames)
    ref = reference_frames(s.x, s.y, s.p, n_frames)
    assert len(ours) == n_frames
    for a, b in zip(ours, ref):
        assert a.dtype == np.uint8 and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_render_frame_last_event_wins_at_a_pixel():
    x = np.array([1, 1, 1, 0, 0])
    y = np.array([2, 2, 2, 0, 0])
    p = np.array([1, 0, 1, 1, 0], dtype=np.uint8)
    img = render_frame(x, y, p)
    assert img.shape == (3, 2, 3)
    assert img[2, 1].tolist() == [255, 0, 0]  # last of red, blue, red
    assert img[0, 0].tolist() == [0, 0, 255]  # last of red, blue
    assert img[1, 0].tolist() == [255, 255, 255]


def test_render_frames_sizes_are_per_chunk():
    # Chunk 0 stays in a 3x4 corner, chunk 1 reaches (9, 6): each frame has its own chunk's size.
    x = np.array([0, 3, 1, 9], dtype=np.int32)
    y = np.array([2, 0, 6, 1], dtype=np.int32)
    s = EventStream(x=x, y=y, t=np.arange(4, dtype=np.int64), p=np.array([0, 1, 1, 0], np.uint8), meta={})
    assert [f.shape for f in render_frames(s, 2)] == [(3, 4, 3), (7, 10, 3)]
    assert [f.shape for f in render_frames(s, 1)] == [(7, 10, 3)]


def test_render_frames_needs_an_event_per_frame():
    with pytest.raises(EgptError, match="at least one event per frame"):
        render_frames(small_stream(0, 4), 5)


def test_render_synthetic_clip_matches_reference():
    s = synthesize_clip(SyntheticClipConfig(width=64, height=48, num_events=5003), seed=3)
    for n in (5, 1):
        for a, b in zip(render_frames(s, n), reference_frames(s.x, s.y, s.p, n)):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("num,n", [(10, 5), (13, 5), (5, 5), (1_000_003, 5), (7, 1), (99, 4)])
def test_split_equal_count(num, n):
    chunks = split_equal_count(num, n)
    per = num // n
    assert len(chunks) == n
    assert [b - a for a, b in chunks[:-1]] == [per] * (n - 1)
    assert chunks[-1][1] - chunks[-1][0] == per + num % n
    assert chunks[0][0] == 0 and chunks[-1][1] == num
    assert all(chunks[i][1] == chunks[i + 1][0] for i in range(n - 1))


def test_split_equal_count_errors():
    with pytest.raises(EgptError, match="4 events cannot render 5 frames"):
        split_equal_count(4, 5)
    with pytest.raises(EgptError):
        split_equal_count(10, 0)


# ---------------------------------------------------------------- npy loading


def test_load_event_npy_round_trip_eventgpt_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    record = {
        "x": rng.integers(0, 640, n).astype(np.uint16),
        "y": rng.integers(0, 480, n).astype(np.uint16),
        "t": np.sort(rng.integers(0, 50_000, n)).astype(np.uint16),
        "p": rng.integers(0, 2, n).astype(bool),
        "time_start": np.int64(123),
        "duration_ms": 50,
        "image_indices_in_clip": [1, 2],
    }
    s = load_event_npy(write_npy_dict(tmp_path / "c.npy", record))
    assert s.num_events == n
    np.testing.assert_array_equal(s.x, record["x"])
    np.testing.assert_array_equal(s.y, record["y"])
    np.testing.assert_array_equal(s.t, record["t"])
    np.testing.assert_array_equal(s.p, record["p"].astype(np.uint8))
    assert s.t.dtype == np.int64 and s.p.dtype == np.uint8
    assert s.x.dtype == np.uint16 and s.y.dtype == np.uint16  # kept as stored: Stage 1 copies nothing
    assert s.warnings == ()
    assert s.meta == {"time_start": 123, "duration_ms": 50}
    assert type(s.meta["time_start"]) is int


def _good_record(n=10):
    return {k: np.arange(n, dtype=np.uint16) for k in ("x", "y", "t")} | {"p": np.ones(n, np.uint8)}


def test_load_event_npy_missing_file(tmp_path):
    with pytest.raises(EgptError, match="does not exist") as e:
        load_event_npy(tmp_path / "nope.npy")
    assert "nope.npy" in str(e.value)


def test_load_event_npy_corrupt_bytes(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"this is not numpy at all \x00\xff" * 10)
    with pytest.raises(EgptError, match="not a readable .npy") as e:
        load_event_npy(bad)
    assert str(bad) in str(e.value)


def test_load_event_npy_truncated(tmp_path):
    good = write_npy_dict(tmp_path / "good.npy", _good_record(1000))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(EgptError, match="corrupt or truncated"):
        load_event_npy(cut)


def test_load_event_npy_not_a_dict(tmp_path):
    with pytest.raises(EgptError, match="not a dict"):
        load_event_npy(write_npy_dict(tmp_path / "arr.npy", np.arange(10)))
    boxed = np.empty((), dtype=object)
    boxed[()] = [1, 2]
    with pytest.raises(EgptError, match="holds a list"):
        load_event_npy(write_npy_dict(tmp_path / "list.npy", boxed))


def test_load_event_npy_plain_pickle_of_wrong_type(tmp_path):
    path = tmp_path / "pickled.npy"
    path.write_bytes(pickle.dumps([1, 2, 3]))  # np.load falls back to unpickling non-npy files
    with pytest.raises(EgptError, match="not a dict"):
        load_event_npy(path)


def test_load_event_npy_missing_keys(tmp_path):
    record = _good_record()
    del record["t"], record["p"]
    with pytest.raises(EgptError, match="lacks the key\\(s\\) t, p"):
        load_event_npy(write_npy_dict(tmp_path / "k.npy", record))


def test_load_event_npy_unequal_lengths(tmp_path):
    record = _good_record()
    record["p"] = np.ones(9, np.uint8)
    with pytest.raises(EgptError, match="unequal length"):
        load_event_npy(write_npy_dict(tmp_path / "u.npy", record))


def test_load_event_npy_zero_events(tmp_path):
    with pytest.raises(EgptError, match="zero events"):
        load_event_npy(write_npy_dict(tmp_path / "z.npy", _good_record(0)))


# ---------------------------------------------------------------- PNG


def test_png_round_trip_and_errors(tmp_path):
    img = render_frame(*(np.array(v) for v in ([0, 5, 3], [4, 1, 0], [0, 1, 1])))
    save_png(img, tmp_path / "sub" / "f.png")
    (loaded,) = load_png_frames([tmp_path / "sub" / "f.png"])
    np.testing.assert_array_equal(loaded, img)
    with pytest.raises(EgptError, match="missing.png"):
        load_png_frames([tmp_path / "missing.png"])
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(EgptError, match="junk.png"):
        load_png_frames([tmp_path / "junk.png"])


# ---------------------------------------------------------------- synthetic clips


def test_synthesize_clip_deterministic_and_valid():
    cfg = SyntheticClipConfig(num_events=20_000)
    a, b, c = synthesize_clip(cfg, 7), synthesize_clip(cfg, 7), synthesize_clip(cfg, 8)
    for k in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.meta == b.meta
    assert not np.array_equal(a.x, c.x)
    assert a.num_events == 20_000
    assert a.x.min() >= 0 and a.x.max() < cfg.width and a.y.min() >= 0 and a.y.max() < cfg.height
    assert a.t.dtype == np.int64 and np.all(np.diff(a.t) >= 0)
    assert a.meta["time_start"] <= a.t[0] and a.t[-1] < a.meta["time_end"]
    assert a.meta["time_end"] - a.meta["time_start"] == cfg.duration_us
    assert a.meta["duration_ms"] == 1000 and a.meta["num_events"] == 20_000
    assert set(np.unique(a.p).tolist()) == {0, 1}
    assert 0.2 < a.p.mean() < 0.8


@pytest.mark.parametrize(
    "cfg",
    [
        SyntheticClipConfig(width=20, height=15, num_events=777, num_objects=3),
        SyntheticClipConfig(num_events=1, num_objects=0, noise_fraction=0.0),
        SyntheticClipConfig(num_events=1000, noise_fraction=1.0),
    ],
)
def test_synthesize_clip_edge_configs(cfg):
    s = synthesize_clip(cfg, 0)
    assert s.num_events == cfg.num_events
    assert s.x.max() < cfg.width and s.y.max() < cfg.height and s.x.min() >= 0 and s.y.min() >= 0


def test_synthesize_clip_rejects_bad_config():
    with pytest.raises(EgptError):
        synthesize_clip(SyntheticClipConfig(num_events=0), 0)
    with pytest.raises(EgptError):
        synthesize_clip(SyntheticClipConfig(noise_fraction=1.5), 0)


# ---------------------------------------------------------------- torch renderer (Stage 2 on the device)


@pytest.mark.parametrize("seed,n", [(0, 1000), (1, 1003), (2, 2999), (3, 7), (4, 5)])
@pytest.mark.parametrize("n_frames", [5, 1])
def test_torch_renderer_pixel_identical_to_reference(seed, n, n_frames):
    from egpt_speed.render_torch import render_frames_torch

    s = small_stream(seed, n)
    ours = render_frames_torch(s, n_frames, "cpu")
    ref = reference_frames(s.x, s.y, s.p, n_frames)
    assert len(ours) == n_frames
    for a, b in zip(ours, ref):
        assert a.dtype == torch.uint8
        np.testing.assert_array_equal(a.numpy(), b)


def test_torch_renderer_on_a_synthetic_clip_and_uint16_input():
    from egpt_speed.render_torch import render_frames_torch

    s = synthesize_clip(SyntheticClipConfig(width=64, height=48, num_events=5003), seed=3)
    s16 = EventStream(x=s.x.astype(np.uint16), y=s.y.astype(np.uint16), t=s.t, p=s.p)  # as EventGPT files store them
    for n in (5, 1):
        for a, b in zip(render_frames_torch(s16, n), reference_frames(s.x, s.y, s.p, n)):
            np.testing.assert_array_equal(a.numpy(), b)
