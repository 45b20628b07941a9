"""Video frames for synthetic clips: a rendered intensity view of the same moving scene the events record.

DSEC-derived datasets pair each event clip with the frame camera's images of the same time window
(``video/<seq>/<clip>/``, 20 Hz); LLaVA and Video-LLaVA read those. A synthetic clip has no camera,
so its frames are reconstructed from its own events by leaky integration: each event adds ±1
(its polarity) to its pixel's log-intensity and fades with time constant ``tau_us``; the image at
time t is grey + gain × that sum. Moving edges show as bright/dark trails that move like the
objects, so the three model families see one scene, each in its own modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from egpt_speed.events import EventStream

VIDEO_DIR = "video"  # the DSEC-derived layout: video/<seq>/<clip>/<frame index:06d>.png


@dataclass(frozen=True)
class IntensityView:
    fps: float = 20.0  # DSEC's frame cameras run at 20 Hz: 20 frames per 1 s clip
    tau_us: float = 100_000.0  # how long an event's brightness change stays visible
    gain: float = 60.0  # grey levels per (decayed) event at a pixel
    grey: float = 128.0


def frame_times(time_start: int, duration_us: int, fps: float) -> np.ndarray:
    """End of each frame's exposure: one frame per 1/fps of the clip, at least one. → [F] int64 µs."""
    count = max(1, int(round(duration_us * fps / 1_000_000)))
    return time_start + (np.arange(1, count + 1, dtype=np.int64) * duration_us) // count


def intensity_frames(stream: "EventStream", width: int, height: int,
                     view: IntensityView = IntensityView()) -> list[np.ndarray]:
    """The clip's video: [height, width, 3] uint8 grey frames, one per 1/fps of the clip.

    Events must be sorted by time (synthetic clips and DSEC slices are). Only the last 8 τ before a
    frame count: an older event would add at most gain · e⁻⁸ ≈ 0.02 grey levels.
    """
    t = np.asarray(stream.t, dtype=np.int64)
    time_start = int(stream.meta.get("time_start", t[0] if len(t) else 0))
    duration = int(stream.meta.get("time_end", time_start + 1) - time_start)
    pixel = np.asarray(stream.y, dtype=np.int64) * width + np.asarray(stream.x, dtype=np.int64)
    sign = np.where(np.asarray(stream.p) > 0, 1.0, -1.0)
    frames = []
    for end in frame_times(time_start, max(duration, 1), view.fps):
        lo, hi = np.searchsorted(t, [end - 8 * view.tau_us, end], side="right")
        weights = sign[lo:hi] * np.exp(-(end - t[lo:hi]) / view.tau_us)
        level = np.bincount(pixel[lo:hi], weights=weights, minlength=width * height)[: width * height]
        grey = np.clip(np.rint(view.grey + view.gain * level), 0, 255).astype(np.uint8).reshape(height, width)
        frames.append(np.repeat(grey[:, :, None], 3, axis=2))
    return frames


def write_clip_video(root: Path, seq: str, clip_id: str, stream: "EventStream", width: int, height: int,
                     view: IntensityView = IntensityView()) -> dict[str, str]:
    """Write ``root/video/<seq>/<clip_id>/000000.png ...`` and return the JSON key naming it (``video_data``)."""
    from PIL import Image

    folder = Path(root) / VIDEO_DIR / seq / clip_id
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(intensity_frames(stream, width, height, view)):
        Image.fromarray(frame).save(folder / f"{index:06d}.png", compress_level=1)
    return {"video_data": f"{seq}/{clip_id}"}


def has_clip_video(root: Path, entry: dict, min_frames: int = 8) -> bool:
    """True when an instruction entry's ``video_data`` folder holds at least ``min_frames`` PNGs (cache check)."""
    relative = entry.get("video_data")
    if not isinstance(relative, str) or not relative:
        return False
    folder = Path(root) / VIDEO_DIR / relative
    return folder.is_dir() and sum(1 for _ in folder.glob("*.png")) >= min_frames
