"""Synthetic video frames: a leaky-integration intensity view of the clip's own events, in the DSEC video/ layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from egpt_speed.events import EventStream, SyntheticClipConfig, synthesize_clip
from egpt_speed.llava_family import load_clip_frames
from egpt_speed.video_frames import IntensityView, frame_times, has_clip_video, intensity_frames, write_clip_video


def stream(x, y, t, p, start=1_000_000, duration=1_000_000) -> EventStream:
    arrays = [np.asarray(v) for v in (x, y, t, p)]
    meta = {"time_start": start, "time_end": start + duration}
    return EventStream(x=arrays[0], y=arrays[1], t=arrays[2] + start, p=arrays[3], meta=meta)


def test_frame_times_are_the_ends_of_equal_intervals():
    assert frame_times(100, 1_000_000, 20.0).tolist() == [100 + 50_000 * k for k in range(1, 21)]
    assert frame_times(0, 10_000, 20.0).tolist() == [10_000]  # a clip shorter than a frame still gets one


def test_each_event_adds_its_decayed_polarity_at_its_pixel():
    view = IntensityView(fps=4.0, tau_us=100_000.0, gain=60.0)
    events = stream(x=[1, 1, 3], y=[0, 0, 2], t=[0, 200_000, 300_000], p=[1, 1, 0])
    frames = intensity_frames(events, width=4, height=3, view=view)
    assert len(frames) == 4 and frames[0].shape == (3, 4, 3) and frames[0].dtype == np.uint8
    first = 128 + 60 * (math.exp(-2.5) + math.exp(-0.5))  # both ON events (0, 200 ms) seen at the first frame end, 250 ms
    assert frames[0][0, 1, 0] == round(first)
    second = 128 + 60 * (math.exp(-5.0) + math.exp(-3.0))  # both ON events at 500 ms
    assert frames[1][0, 1, 0] == round(second)
    assert frames[1][2, 3, 0] == round(128 - 60 * math.exp(-2.0))  # OFF event darkens
    assert frames[1][1, 1, 0] == 128  # untouched pixels stay grey
    assert np.array_equal(frames[1][..., 0], frames[1][..., 2])  # grey replicated to RGB


def test_synthetic_video_follows_the_moving_scene_and_is_deterministic(tmp_path):
    config = SyntheticClipConfig(width=64, height=48, num_events=20_000, num_objects=2)
    clip = synthesize_clip(config, seed=3)
    frames = intensity_frames(clip, config.width, config.height)
    assert len(frames) == 20  # 1 s at DSEC's 20 Hz
    assert all(np.array_equal(a, b) for a, b in zip(frames, intensity_frames(clip, config.width, config.height)))
    assert not np.array_equal(frames[0], frames[-1])  # things move
    entry = write_clip_video(tmp_path, "synthetic_00_a", "000000", clip, config.width, config.height)
    assert entry == {"video_data": "synthetic_00_a/000000"} and has_clip_video(tmp_path, entry)
    assert not has_clip_video(tmp_path, {"video_data": "synthetic_00_a/000001"})


@dataclass(frozen=True)
class Spec:
    id: str
    event_path: Path


def test_llava_family_stage1_reads_the_written_video(tmp_path):
    config = SyntheticClipConfig(width=64, height=48, num_events=5_000, num_objects=1)
    clip = synthesize_clip(config, seed=5)
    write_clip_video(tmp_path, "synthetic_00_a", "000002", clip, config.width, config.height)
    spec = Spec("000002", tmp_path / "event_npy" / "synthetic_00_a" / "000002.npy")
    written = intensity_frames(clip, config.width, config.height)
    video = load_clip_frames(spec, "video_llava")
    assert [np.array_equal(v, written[k]) for v, k in zip(video, (0, 2, 5, 8, 10, 13, 16, 19))] == [True] * 8
    assert np.array_equal(load_clip_frames(spec, "llava")[0], written[9])
