"""Finding samples: EventGPT's DSEC-derived dataset layout, plain npy folders, single clips, synthetic data."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from egpt_speed.errors import EgptError
from egpt_speed.events import INSTRUCTION_JSON, OFFICIAL_FRAMES, SyntheticClipConfig, write_synthetic_dataset

DEFAULT_QUERY = "What are the key elements in this scene?"
QUESTIONS_RESOURCE = "resources/dsec_top50_questions.json"
# Bump when the synthetic generator or layout changes, so stale caches are not reused.
SYNTHETIC_VERSION = 2
VIDEO_FRAMES_NEEDED = 8  # Video-LLaVA's frames per clip; LLaVA takes one of them


@dataclass(frozen=True)
class SampleSpec:
    id: str
    event_path: Path | None  # the npy clip (None only for png-only data)
    image_paths: tuple[Path, ...]  # pre-rendered 5-frame PNGs (may be empty)
    image_1f_paths: tuple[Path, ...]  # pre-rendered 1-frame PNG (may be empty)
    query: str  # the user question, '<event>' removed and stripped
    video_dir: Path | None = None  # the clip's RGB frames (data/video/<video_data>), for LLaVA / Video-LLaVA


# ---------------------------------------------------------------- questions


def load_questions(path: Path | None = None) -> list[str]:
    """Questions of a [{question, count}] JSON, most frequent first (default: the packaged DSEC top 50)."""
    if path is None:
        source = resources.files("egpt_speed").joinpath(QUESTIONS_RESOURCE)
        where = f"packaged {QUESTIONS_RESOURCE}"
    else:
        source, where = Path(path), str(path)
    try:
        entries = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EgptError(f"Question file {where} does not exist; check the path.") from exc
    except (OSError, ValueError, RecursionError) as exc:
        raise EgptError(f"Question file {where} is not valid JSON ({exc}); fix or replace it.") from exc
    if not isinstance(entries, list) or not entries or not all(_is_question(e) for e in entries):
        raise EgptError(f"Question file {where} must be a non-empty list of {{\"question\", \"count\"}} entries.")
    ranked = sorted(entries, key=lambda e: -int(e.get("count", 0)))  # stable: ties keep file order
    return [e["question"] for e in ranked]


def _is_question(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("question"), str)
        and isinstance(entry.get("count", 0), int)
    )


# ---------------------------------------------------------------- discovery


def discover_samples(data: Path, limit: int | None = None, *, allow_outside: bool = False) -> list[SampleSpec]:
    """Samples from a dataset dir (instruction JSON), a folder of .npy clips, or one .npy clip.

    Paths in the instruction JSON must stay inside the dataset dir (no absolute paths, no escaping
    `..`) unless `allow_outside` (the CLI's --allow-paths-outside-data).
    """
    data = Path(data)
    if limit is not None and limit < 1:
        raise EgptError(f"Sample limit {limit} is invalid; use a positive number or no limit.")
    if not data.exists():
        raise EgptError(f"Data path {data} does not exist; pass a dataset dir, a folder of .npy clips or one .npy.")
    if data.is_file():
        if data.suffix != ".npy":
            raise EgptError(f"Data path {data} is not an .npy clip; pass a dataset dir, a folder of .npy or one .npy.")
        return [_npy_sample(data.stem, data)]
    if (data / INSTRUCTION_JSON).is_file():
        return _from_instruction_json(data, limit, allow_outside)
    clips = sorted(data.rglob("*.npy"))[:limit]
    if not clips:
        raise EgptError(
            f"Data dir {data} has neither {INSTRUCTION_JSON} nor any .npy clips; "
            "pass an EventGPT dataset dir or a folder of .npy event clips."
        )
    return [_npy_sample(clip.relative_to(data).with_suffix("").as_posix(), clip) for clip in clips]


def _npy_sample(sample_id: str, path: Path) -> SampleSpec:
    return SampleSpec(id=sample_id, event_path=path, image_paths=(), image_1f_paths=(), query=DEFAULT_QUERY)


def _from_instruction_json(data: Path, limit: int | None, allow_outside: bool) -> list[SampleSpec]:
    json_path = data / INSTRUCTION_JSON
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise EgptError(f"Instruction file {json_path} does not parse as JSON ({exc}); fix or regenerate it.") from exc
    if not isinstance(entries, list) or not all(_is_entry(e) for e in entries):
        raise EgptError(
            f"Instruction file {json_path} must be a list of entries each with string 'id' and 'event_data'."
        )
    if not entries:
        raise EgptError(f"Instruction file {json_path} lists no samples; point at a dataset with entries.")
    resolve = _DataPaths(data, json_path, allow_outside)
    samples = [_entry_sample(resolve, e) for e in entries[:limit]]
    for sample in samples:
        if not sample.event_path.is_file():
            raise EgptError(
                f"Event clip {sample.event_path} (sample {sample.id} of {json_path}) does not exist; "
                "check the event_npy folder."
            )
    return samples


def _is_entry(entry: object) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("event_data"), str)


@dataclass(frozen=True)
class _DataPaths:
    """Resolves the instruction JSON's relative paths under their dataset folder, refusing escapes."""

    root: Path
    json_path: Path
    allow_outside: bool

    def __call__(self, folder: str, value: str, sample_id: str, key: str) -> Path:
        path = self.root / folder / value
        if self.allow_outside:
            return path
        inside = os.path.normpath(os.path.join(folder, value))
        if os.path.isabs(value) or os.path.isabs(inside) or inside == ".." or inside.startswith(".." + os.sep):
            raise EgptError(
                f"Sample {sample_id} of {self.json_path}: {key} '{value}' points outside the dataset dir {self.root}; "
                "keep its paths relative and inside it, or pass --allow-paths-outside-data if you trust this file."
            )
        return self.root / inside


def _entry_sample(resolve: _DataPaths, entry: dict) -> SampleSpec:
    sample_id = entry["id"]
    return SampleSpec(
        id=sample_id,
        event_path=resolve("event_npy", entry["event_data"], sample_id, "event_data"),
        image_paths=_relative_paths(resolve, "event_image", entry.get("event_image"), sample_id),
        image_1f_paths=_relative_paths(resolve, "event_image_1f", entry.get("event_image_1f"), sample_id),
        query=_query(entry.get("conversations")),
        video_dir=_video_dir(resolve, entry.get("video_data"), sample_id),
    )


def _video_dir(resolve: _DataPaths, value: object, sample_id: str) -> Path | None:
    return resolve("video", value, sample_id, "video_data") if isinstance(value, str) and value else None


def _relative_paths(resolve: _DataPaths, folder: str, value: object, sample_id: str) -> tuple[Path, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(resolve(folder, v, sample_id, folder) for v in value if isinstance(v, str) and v)


def _query(conversations: object) -> str:
    if not isinstance(conversations, list):
        return DEFAULT_QUERY
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "human":
            text = str(turn.get("value") or "").replace("<event>", "").strip()
            return text or DEFAULT_QUERY
    return DEFAULT_QUERY


# ---------------------------------------------------------------- synthetic data


def synthetic_dataset(num_clips: int, seed: int, config: SyntheticClipConfig, cache_dir: Path,
                      video: bool = False) -> Path:
    """A cached synthetic dataset in the real layout, so '--data synthetic' goes through the normal loader.

    `video`: also the clips' video frames (for LLaVA / Video-LLaVA), cached apart: at 640×480 they
    cost about twice the rest of a clip, which EventGPT runs need not pay.
    """
    root = Path(cache_dir) / (_synthetic_name(num_clips, seed, config) + ("_video" if video else ""))
    if _is_complete(root, num_clips, video):
        return root
    if root.exists():
        shutil.rmtree(root)  # our own cache entry, left unusable by an edit or a crash: rebuild it
    root.parent.mkdir(parents=True, exist_ok=True)
    return write_synthetic_dataset(root, num_clips, seed, config, load_questions(), video=video)


def _synthetic_name(num_clips: int, seed: int, config: SyntheticClipConfig) -> str:
    return (
        f"synthetic_v{SYNTHETIC_VERSION}_n{num_clips}_s{seed}_{config.width}x{config.height}"
        f"_d{config.duration_us}_e{config.num_events}_o{config.num_objects}_z{config.noise_fraction:g}"
    )


def _is_complete(root: Path, num_clips: int, video: bool = False) -> bool:
    if not (root / INSTRUCTION_JSON).is_file():
        return False
    try:
        samples = discover_samples(root)
    except EgptError:
        return False
    return len(samples) == num_clips and all(
        len(s.image_paths) == OFFICIAL_FRAMES
        and len(s.image_1f_paths) == 1
        and all(p.is_file() for p in (*s.image_paths, *s.image_1f_paths))
        and (not video or _has_video(s.video_dir))
        for s in samples
    )


def _has_video(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and sum(1 for _ in folder.glob("*.png")) >= VIDEO_FRAMES_NEEDED


def resolve_samples(data: str, samples: int, warmup: int, seed: int, synthetic_events: int,
                    cache_dir: Path, *, allow_outside: bool = False, video: bool = False) -> list[SampleSpec]:
    """The samples of `--data`: a dataset on disk, or `samples + warmup` synthetic clips cached under `cache_dir`
    (with video frames when `video`: the LLaVA families read those)."""
    if data != "synthetic":
        return discover_samples(Path(data), allow_outside=allow_outside)
    root = synthetic_dataset(samples + warmup, seed, SyntheticClipConfig(num_events=synthetic_events), cache_dir, video)
    return discover_samples(root)
