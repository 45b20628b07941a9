"""Event clips: EventGPT's npy format, its official equal-count frame rendering, and synthetic clips."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from egpt_speed.errors import EgptError
from egpt_speed.safe_load import load_npy
from egpt_speed.video_frames import write_clip_video

EVENT_KEYS = ("x", "y", "t", "p")
OFFICIAL_FRAMES = 5
INSTRUCTION_JSON = "EventGPT_Instruction_Subset.json"
# Largest frame side accepted (pixels): DSEC is 640x480, the largest event sensors ~1280x720; a clip with
# x = 65535 would otherwise make the renderer allocate a 65536-wide frame per chunk (tens of GiB).
MAX_SENSOR_SIDE = 4096

# Colour of a pixel by code: 0 untouched (white), 1 last event had polarity 0 (blue), 2 polarity 1 (red).
_PALETTE = np.array([[255, 255, 255], [0, 0, 255], [255, 0, 0]], dtype=np.uint8)


@dataclass(frozen=True)
class EventStream:
    x: np.ndarray  # [N] unsigned/signed integer pixel column (as stored, at most 32 bits)
    y: np.ndarray  # [N] integer pixel row
    t: np.ndarray  # [N] int64 timestamps, µs
    p: np.ndarray  # [N] uint8 polarity 0/1
    meta: dict = field(default_factory=dict)  # other keys of the npy dict, JSON-friendly scalars only
    warnings: tuple[str, ...] = ()  # data oddities that did not stop loading (unsorted/negative t), for the result

    @property
    def num_events(self) -> int:
        return int(self.x.shape[0])


# ---------------------------------------------------------------- loading


def load_event_npy(path: Path, max_coordinate: int = MAX_SENSOR_SIDE - 1) -> EventStream:
    """Read one EventGPT clip: an .npy holding a pickled dict with x, y, t, p (+ metadata keys).

    Nothing in the file can run code (restricted unpickler); x/y above `max_coordinate` are refused
    before any frame is allocated; unsorted or negative timestamps only add to `warnings`.
    """
    path = Path(path)
    if not path.is_file():
        raise EgptError(f"Event file {path} does not exist; check the path or the dataset layout.")
    raw = _read_npy_dict(path)
    missing = [k for k in EVENT_KEYS if k not in raw]
    if missing:
        raise EgptError(
            f"Event file {path} lacks the key(s) {', '.join(missing)}; "
            "an EventGPT clip must be a dict with x, y, t and p arrays."
        )
    not_arrays = [k for k in EVENT_KEYS if not isinstance(raw[k], np.ndarray)]
    if not_arrays:  # before np.asarray: a few hundred bytes of memo-shared nested lists expand to gigabytes
        raise EgptError(f"Event file {path} holds {', '.join(not_arrays)} as {type(raw[not_arrays[0]]).__name__}, "
                        "not numpy arrays; an EventGPT clip is a dict of x, y, t and p arrays.")
    arrays = {k: raw[k] for k in EVENT_KEYS}
    _check_event_arrays(path, arrays)
    _check_coordinates(path, arrays, max_coordinate)
    t = arrays["t"].astype(np.int64, copy=False)
    return EventStream(
        x=_to_pixel_index(arrays["x"]),
        y=_to_pixel_index(arrays["y"]),
        t=t,
        p=_to_polarity(arrays["p"]),
        meta=_json_scalars({k: v for k, v in raw.items() if k not in EVENT_KEYS}),
        warnings=_timestamp_warnings(path, t),
    )


def _read_npy_dict(path: Path) -> dict:
    loaded = load_npy(path)
    obj = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.size == 1 else loaded
    if not isinstance(obj, dict):
        raise EgptError(
            f"Event file {path} holds a {type(obj).__name__}, not a dict; "
            "an EventGPT clip must be a pickled dict with x, y, t and p arrays."
        )
    return obj


def _check_event_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for key, arr in arrays.items():
        if arr.ndim != 1:
            raise EgptError(f"Event file {path} has a {arr.ndim}-D '{key}'; each of x, y, t, p must be a 1-D array.")
        allowed = "iub" if key == "p" else "iu"
        if arr.dtype.kind not in allowed:
            raise EgptError(f"Event file {path} has '{key}' of dtype {arr.dtype}; it must hold integers.")
    lengths = {k: int(a.shape[0]) for k, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise EgptError(f"Event file {path} has arrays of unequal length {lengths}; the clip is inconsistent.")
    if lengths["x"] == 0:
        raise EgptError(f"Event file {path} holds zero events; a clip needs events to render frames.")
    for key in ("x", "y"):
        if arrays[key].dtype.kind == "i" and int(arrays[key].min()) < 0:
            raise EgptError(f"Event file {path} has negative '{key}' pixel coordinates; they must be >= 0.")


def _check_coordinates(path: Path, arrays: dict[str, np.ndarray], max_coordinate: int) -> None:
    for key in ("x", "y"):
        top = int(arrays[key].max())
        if top > max_coordinate:
            raise EgptError(
                f"Event file {path} has '{key}' up to {top}, beyond the sensor bound {max_coordinate}: EventGPT frames "
                f"are (max y + 1) x (max x + 1) pixels, so this clip would need a {top + 1}-pixel side; fix the clip."
            )


def _timestamp_warnings(path: Path, t: np.ndarray) -> tuple[str, ...]:
    found = []
    backwards = int(np.count_nonzero(t[1:] < t[:-1]))
    # Sorted (the usual case): only the first timestamp can be negative, which saves Stage 1 a pass over t.
    negative = int(np.count_nonzero(t < 0)) if backwards or t[0] < 0 else 0
    if negative:
        found.append(f"{path.name}: {negative} negative timestamp(s); rendering ignores t, frames unaffected")
    if backwards:
        found.append(f"{path.name}: timestamps not sorted ({backwards} decreasing step(s)); rendering ignores t, "
                     "frames unaffected")
    return tuple(found)


def _to_pixel_index(arr: np.ndarray) -> np.ndarray:
    # Stored dtypes (uint16 in EventGPT's files) are kept: the renderers widen on the fly, so Stage 1 copies nothing.
    if arr.dtype.itemsize <= 4:
        return arr
    return arr.astype(np.int64, copy=False)


def _to_polarity(p: np.ndarray) -> np.ndarray:
    if p.dtype == np.bool_:
        return p.view(np.uint8)
    if p.dtype == np.uint8 and int(p.max()) <= 1:
        return p
    # The reference renderer treats any non-zero polarity as "on", so -1/1 encodings map correctly too.
    return (p != 0).view(np.uint8)


def _json_scalars(meta: dict) -> dict:
    out = {}
    for key, value in meta.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
    return out


# ---------------------------------------------------------------- rendering


def split_equal_count(num_events: int, n_chunks: int) -> list[tuple[int, int]]:
    """EventGPT's split: n chunks of equal event count, the last one taking the remainder."""
    if n_chunks < 1:
        raise EgptError(f"Cannot split events into {n_chunks} chunks; ask for at least 1 frame.")
    if num_events < n_chunks:
        raise EgptError(
            f"A clip with {num_events} events cannot render {n_chunks} frames; it needs at least one event per frame."
        )
    per = num_events // n_chunks
    bounds = [(i * per, (i + 1) * per) for i in range(n_chunks)]
    bounds[-1] = (bounds[-1][0], num_events)
    return bounds


def render_frame(x: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """One RGB frame [max y + 1, max x + 1, 3]: white, polarity 1 red, 0 blue, the last event at a pixel wins."""
    if len(x) == 0:
        raise EgptError("Cannot render a frame from zero events; pass a non-empty chunk.")
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    height, width = int(y.max()) + 1, int(x.max()) + 1
    check_frame_size(height, width)
    pixel = y * width + x
    # Encode (event order, polarity) in one integer so a per-pixel max picks the last event and its polarity;
    # ufunc.at is documented to apply every repeated index, unlike fancy assignment.
    order_and_pol = np.arange(len(pixel), dtype=np.int64) * 2 + (np.asarray(p) != 0)
    last = np.full(height * width, -1, dtype=np.int64)
    np.maximum.at(last, pixel, order_and_pol)
    code = np.where(last >= 0, (last & 1) + 1, 0)
    return _PALETTE[code].reshape(height, width, 3)


def check_frame_size(height: int, width: int) -> None:
    if max(height, width) > MAX_SENSOR_SIDE:
        raise EgptError(
            f"A frame of {height}x{width} pixels exceeds the {MAX_SENSOR_SIDE}-pixel sensor bound; "
            "the clip's x/y coordinates are out of range, so fix the clip."
        )


def render_frames(stream: EventStream, n_frames: int) -> list[np.ndarray]:
    """The official rendering: n equal-count chunks, one frame each (n_frames=1: all events in one frame)."""
    return [
        render_frame(stream.x[a:b], stream.y[a:b], stream.p[a:b])
        for a, b in split_equal_count(stream.num_events, n_frames)
    ]


# ---------------------------------------------------------------- PNG frames


def load_png_frames(paths: Sequence[Path]) -> list[np.ndarray]:
    return [_load_png(Path(p)) for p in paths]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_png(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB; 8-bit RGB PNGs (what EventGPT saves) through the fastest installed decoder, others through PIL."""
    if not path.is_file():
        raise EgptError(f"Frame image {path} does not exist; check the dataset's event_image folders.")
    data = path.read_bytes()
    header = _png_header(data)
    decode = fast_png_decoder()
    if header is None or decode is None or not header[2]:
        return _load_png_pil(path, data)
    width, height, _ = header
    _check_image_side(path, width, height)
    try:
        return decode(data)
    except Exception:  # a file the fast decoder rejects gets PIL's diagnosis
        return _load_png_pil(path, data)


def _png_header(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, is 8-bit RGB without palette or alpha) from the IHDR chunk; None if not a PNG."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width, height, data[24] == 8 and data[25] == 2


def _check_image_side(path: Path, width: int, height: int) -> None:
    if max(width, height) > MAX_SENSOR_SIDE:
        raise EgptError(f"Frame image {path} is {width}x{height} pixels, beyond the "
                        f"{MAX_SENSOR_SIDE}-pixel sensor bound; re-render it from its clip.")


def _load_png_pil(path: Path, data: bytes) -> np.ndarray:
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: the size is known before any pixel is decoded
            _check_image_side(path, *img.size)
            return np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except EgptError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for bad files
        raise EgptError(f"Frame image {path} cannot be read ({exc}); it may be corrupt, so re-render it.") from exc


@functools.lru_cache(maxsize=1)
def fast_png_decoder():
    """bytes of an 8-bit RGB PNG → [H, W, 3] uint8, by torchvision or OpenCV when installed; None → PIL."""
    for make in (_torchvision_decoder, _opencv_decoder):
        try:
            return make()
        except Exception:  # not installed, or installed but broken (e.g. built for another torch): next one
            continue
    return None


def _torchvision_decoder():
    import torch
    from torchvision.io import ImageReadMode, decode_png

    def decode(data: bytes) -> np.ndarray:  # [3, H, W] → an [H, W, 3] view, no copy
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_png(buffer, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
    decode.name = "torchvision"
    return decode


def _opencv_decoder():
    import cv2

    def decode(data: bytes) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    decode.name = "opencv"
    return decode


def png_decoder_name() -> str:
    """Which decoder `--source png` uses for 8-bit RGB PNGs here: torchvision, opencv or pil (for the result)."""
    decode = fast_png_decoder()
    return decode.name if decode is not None else "pil"


def save_png(img: np.ndarray, path: Path) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise EgptError(f"Cannot save {path}: expected an [H, W, 3] uint8 image, got {img.shape} {img.dtype}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="RGB").save(path, format="PNG")


# ---------------------------------------------------------------- synthetic clips


@dataclass(frozen=True)
class SyntheticClipConfig:
    width: int = 640
    height: int = 480
    duration_us: int = 1_000_000
    num_events: int = 200_000  # 1e5..1e6 realistic for 1 s DSEC clips
    num_objects: int = 6  # moving structures (edges/blobs/lines) generating events
    noise_fraction: float = 0.05  # uniformly random background events


def _check_config(config: SyntheticClipConfig) -> None:
    if config.width < 1 or config.height < 1:
        raise EgptError(f"Synthetic clip size {config.width}x{config.height} is invalid; use positive dimensions.")
    if config.duration_us < 1:
        raise EgptError(f"Synthetic clip duration {config.duration_us} µs is invalid; use at least 1 µs.")
    if config.num_events < 1:
        raise EgptError(f"Synthetic clip event count {config.num_events} is invalid; use at least 1 event.")
    if config.num_objects < 0:
        raise EgptError(f"Synthetic clip object count {config.num_objects} is invalid; use 0 or more.")
    if not 0.0 <= config.noise_fraction <= 1.0:
        raise EgptError(f"Synthetic noise fraction {config.noise_fraction} is invalid; use a value in [0, 1].")


@dataclass(frozen=True)
class _Points:
    x: np.ndarray  # float pixel coordinates
    y: np.ndarray
    t: np.ndarray  # int64 µs relative to clip start
    p: np.ndarray  # uint8


def synthesize_clip(config: SyntheticClipConfig, seed: int) -> EventStream:
    """A deterministic, DSEC-like clip: moving edges/bars/ellipses, a translating texture, and noise."""
    _check_config(config)
    rng = np.random.default_rng(seed)
    n_noise = int(round(config.num_events * config.noise_fraction))
    if config.num_objects == 0:
        n_noise = config.num_events
    n_signal = config.num_events - n_noise
    parts = [_noise(rng, config, n_noise)]
    if n_signal:
        # One extra "object" is the ego-motion texture; structures get uneven shares of the events.
        counts = rng.multinomial(n_signal, rng.dirichlet(np.full(config.num_objects + 1, 2.0)))
        parts.append(_texture(rng, config, int(counts[0])))
        for k, count in enumerate(counts[1:]):
            maker = _ellipse if k % 2 == 0 else _bar
            parts.append(maker(rng, config, int(count)))
    return _assemble(rng, config, parts)


def _assemble(rng: np.random.Generator, config: SyntheticClipConfig, parts: list[_Points]) -> EventStream:
    x = np.clip(np.rint(np.concatenate([q.x for q in parts])), 0, config.width - 1).astype(np.int32)
    y = np.clip(np.rint(np.concatenate([q.y for q in parts])), 0, config.height - 1).astype(np.int32)
    t = np.concatenate([q.t for q in parts])
    p = np.concatenate([q.p for q in parts])
    order = np.argsort(t, kind="stable")
    time_start = int(rng.integers(40_000_000_000, 60_000_000_000))
    meta = {
        "time_start": time_start,
        "time_end": time_start + config.duration_us,
        "duration_ms": config.duration_us // 1000 if config.duration_us % 1000 == 0 else config.duration_us / 1000,
        "num_events": int(len(t)),
    }
    return EventStream(x=x[order], y=y[order], t=t[order] + time_start, p=p[order], meta=meta)


def _times(rng: np.random.Generator, config: SyntheticClipConfig, n: int) -> np.ndarray:
    return rng.integers(0, config.duration_us, n, dtype=np.int64)


def _noise(rng: np.random.Generator, config: SyntheticClipConfig, n: int) -> _Points:
    return _Points(
        x=rng.uniform(0, config.width, n) - 0.5,
        y=rng.uniform(0, config.height, n) - 0.5,
        t=_times(rng, config, n),
        p=rng.integers(0, 2, n, dtype=np.uint8),
    )


def _edge_polarity(rng: np.random.Generator, facing: np.ndarray, contrast: int) -> np.ndarray:
    """Leading edges (normal along the motion) get one polarity, trailing edges the other; 5 % flip."""
    on = (facing > 0) == (contrast > 0)
    flip = rng.random(len(facing)) < 0.05
    return (on ^ flip).astype(np.uint8)


def _track(rng: np.random.Generator, config: SyntheticClipConfig, margin_x: float, margin_y: float):
    """Start and end centres inside the sensor (minus a margin), so the straight path stays in view."""
    lo = np.array([margin_x, margin_y])
    hi = np.maximum(lo, np.array([config.width - 1 - margin_x, config.height - 1 - margin_y]))
    start, end = rng.uniform(lo, hi), rng.uniform(lo, hi)
    return start, end - start


def _ellipse(rng: np.random.Generator, config: SyntheticClipConfig, n: int) -> _Points:
    size = min(config.width, config.height)
    a, b = rng.uniform(0.04, 0.15, 2) * size + 1.0
    phi = rng.uniform(0, math.pi)
    r = max(a, b)
    start, delta = _track(rng, config, r, r)
    t = _times(rng, config, n)
    frac = t / config.duration_us
    theta = rng.uniform(0, 2 * math.pi, n)
    ex, ey = a * np.cos(theta), b * np.sin(theta)
    c, s = math.cos(phi), math.sin(phi)
    dx, dy = c * ex - s * ey, s * ex + c * ey
    # Outward normal of an ellipse at theta is along (cos/a, sin/b), rotated by phi.
    nx0, ny0 = np.cos(theta) / a, np.sin(theta) / b
    facing = (c * nx0 - s * ny0) * delta[0] + (s * nx0 + c * ny0) * delta[1]
    jitter = rng.normal(0, 0.7, (2, n))
    return _Points(
        x=start[0] + delta[0] * frac + dx + jitter[0],
        y=start[1] + delta[1] * frac + dy + jitter[1],
        t=t,
        p=_edge_polarity(rng, facing, int(rng.choice([-1, 1]))),
    )


def _bar(rng: np.random.Generator, config: SyntheticClipConfig, n: int) -> _Points:
    size = min(config.width, config.height)
    length = rng.uniform(0.15, 0.6) * size + 1.0
    thickness = rng.uniform(2.0, 0.05 * size + 3.0)
    phi = rng.uniform(0, math.pi)
    along = np.array([math.cos(phi), math.sin(phi)])
    normal = np.array([-along[1], along[0]])
    half = length / 2
    start, delta = _track(rng, config, abs(along[0]) * half + thickness, abs(along[1]) * half + thickness)
    t = _times(rng, config, n)
    frac = t / config.duration_us
    s = rng.uniform(-half, half, n)
    side = rng.choice(np.array([-1.0, 1.0]), n)
    offset = side * thickness / 2 + rng.normal(0, 0.6, n)
    facing = side * float(normal @ delta)
    return _Points(
        x=start[0] + delta[0] * frac + s * along[0] + offset * normal[0],
        y=start[1] + delta[1] * frac + s * along[1] + offset * normal[1],
        t=t,
        p=_edge_polarity(rng, facing, int(rng.choice([-1, 1]))),
    )


def _texture(rng: np.random.Generator, config: SyntheticClipConfig, n: int) -> _Points:
    """Ego-motion: many short static edge segments translating together, wrapping round the sensor."""
    n_segments = 60
    seg_x = rng.uniform(0, config.width, n_segments)
    seg_y = rng.uniform(0, config.height, n_segments)
    seg_phi = rng.uniform(0, math.pi, n_segments)
    seg_len = rng.uniform(3.0, 0.08 * min(config.width, config.height) + 4.0, n_segments)
    seg_contrast = rng.choice(np.array([-1.0, 1.0]), n_segments)
    speed = rng.uniform(0.05, 0.3) * config.width  # pixels over the clip
    heading = rng.uniform(0, 2 * math.pi)
    velocity = speed * np.array([math.cos(heading), math.sin(heading)])
    t = _times(rng, config, n)
    frac = t / config.duration_us
    seg = rng.integers(0, n_segments, n)
    s = rng.uniform(-0.5, 0.5, n) * seg_len[seg]
    ax, ay = np.cos(seg_phi[seg]), np.sin(seg_phi[seg])
    facing = (-ay * velocity[0] + ax * velocity[1]) * seg_contrast[seg]
    return _Points(
        x=np.mod(seg_x[seg] + s * ax + velocity[0] * frac + rng.normal(0, 0.5, n), config.width),
        y=np.mod(seg_y[seg] + s * ay + velocity[1] * frac + rng.normal(0, 0.5, n), config.height),
        t=t,
        p=_edge_polarity(rng, facing, 1),
    )


# ---------------------------------------------------------------- synthetic dataset


def write_synthetic_dataset(
    root: Path, num_clips: int, seed: int, config: SyntheticClipConfig, questions: Sequence[str], video: bool = True
) -> Path:
    """Write a DSEC-derived-layout dataset of synthetic clips at root, atomically (temp dir, then rename).

    `video`: also each clip's video frames (`video/<seq>/<clip>/`, an intensity view of the same scene).
    """
    root = Path(root)
    if num_clips < 1:
        raise EgptError(f"Cannot write a synthetic dataset of {num_clips} clips; ask for at least 1.")
    if not questions:
        raise EgptError(f"Cannot write the synthetic dataset {root} without questions; pass at least one.")
    if root.exists():
        raise EgptError(f"Synthetic dataset target {root} already exists; delete it or choose another path.")
    _check_config(config)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        entries = [_write_clip(tmp, i, num_clips, seed, config, questions, video) for i in range(num_clips)]
        (tmp / INSTRUCTION_JSON).write_text(json.dumps(entries, indent=1))
        try:
            tmp.rename(root)
        except OSError:  # another process wrote the same deterministic dataset first: keep its copy
            if not (root / INSTRUCTION_JSON).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _clip_location(index: int, num_clips: int) -> tuple[str, str]:
    """Consecutive clips share a sequence (two sequences, like DSEC recordings); ids are unique."""
    per_seq = max(1, math.ceil(num_clips / 2))
    return f"synthetic_{index // per_seq:02d}_a", f"{index:06d}"


def _write_clip(
    tmp: Path, index: int, num_clips: int, seed: int, config: SyntheticClipConfig, questions: Sequence[str],
    video: bool = True,
) -> dict:
    seq, clip_id = _clip_location(index, num_clips)
    clip_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    stream = synthesize_clip(config, clip_seed)
    npy = tmp / "event_npy" / seq / f"{clip_id}.npy"
    npy.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "x": stream.x.astype(np.uint16),
        "y": stream.y.astype(np.uint16),
        "t": stream.t.astype(np.int64),
        "p": stream.p.astype(np.uint8),
        **stream.meta,
    }
    np.save(npy, record, allow_pickle=True)
    images = _write_frames(tmp / "event_image", seq, clip_id, render_frames(stream, OFFICIAL_FRAMES))
    images_1f = _write_frames(tmp / "event_image_1f", seq, clip_id, render_frames(stream, 1))
    videos = write_clip_video(tmp, seq, clip_id, stream, config.width, config.height) if video else {}
    return {
        "id": clip_id,
        "split": "test",
        "event_data": f"{seq}/{clip_id}.npy",
        "event_image": images,
        "event_image_1f": images_1f,
        "conversations": [
            {"from": "human", "value": "<event>\n" + questions[index % len(questions)]},
            {"from": "gpt", "value": ""},
        ],
        **videos,
    }


def _write_frames(folder: Path, seq: str, clip_id: str, frames: list[np.ndarray]) -> list[str]:
    rel = [f"{seq}/{clip_id}_{k}.png" for k in range(len(frames))]
    for name, frame in zip(rel, frames):
        save_png(frame, folder / name)
    return rel
