import json
from pathlib import Path

import numpy as np
import pytest

from egpt_speed.datasets import DEFAULT_QUERY, discover_samples, load_questions, synthetic_dataset
from egpt_speed.errors import EgptError
from egpt_speed.events import (
    SyntheticClipConfig,
    load_event_npy,
    load_png_frames,
    render_frames,
    write_synthetic_dataset,
)

SMALL = SyntheticClipConfig(width=64, height=48, num_events=3000, num_objects=3)
JSON_NAME = "EventGPT_Instruction_Subset.json"


def write_clip(path: Path, n: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    record = {
        "x": rng.integers(0, 30, n).astype(np.uint16),
        "y": rng.integers(0, 20, n).astype(np.uint16),
        "t": np.arange(n, dtype=np.uint16),
        "p": rng.integers(0, 2, n).astype(bool),
    }
    np.save(path, record, allow_pickle=True)
    return path


def write_json(root: Path, entries) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / JSON_NAME).write_text(json.dumps(entries) if not isinstance(entries, str) else entries)


# ---------------------------------------------------------------- questions


def test_load_questions_packaged_most_frequent_first():
    qs = load_questions()
    assert len(qs) == 50
    assert qs[0] == "What are the key elements in this scene?" == DEFAULT_QUERY
    assert len(set(qs)) == 50


def test_load_questions_sorts_by_count_and_reports_bad_files(tmp_path):
    f = tmp_path / "q.json"
    f.write_text(json.dumps([{"question": "rare", "count": 1}, {"question": "common", "count": 9}]))
    assert load_questions(f) == ["common", "rare"]
    f.write_text("{not json")
    with pytest.raises(EgptError, match="q.json"):
        load_questions(f)
    with pytest.raises(EgptError, match="does not exist"):
        load_questions(tmp_path / "none.json")


# ---------------------------------------------------------------- synthetic round trip


def test_write_synthetic_dataset_round_trip(tmp_path):
    questions = ["Q zero?", "Q one?", "Q two?"]
    root = write_synthetic_dataset(tmp_path / "ds", 4, seed=1, config=SMALL, questions=questions)
    assert root == tmp_path / "ds"
    assert not list(tmp_path.glob("*.tmp*"))
    samples = discover_samples(root)
    assert [s.id for s in samples] == ["000000", "000001", "000002", "000003"]
    assert [s.query for s in samples] == ["Q zero?", "Q one?", "Q two?", "Q zero?"]
    assert len({s.event_path.parent.name for s in samples}) == 2  # two sequences
    for s in samples:
        assert s.event_path.is_file() and s.event_path.is_relative_to(root / "event_npy")
        assert len(s.image_paths) == 5 and len(s.image_1f_paths) == 1
        assert all(p.is_relative_to(root / "event_image") for p in s.image_paths)
        assert all(p.is_relative_to(root / "event_image_1f") for p in s.image_1f_paths)
        stream = load_event_npy(s.event_path)
        assert stream.num_events == SMALL.num_events
        assert stream.meta["num_events"] == SMALL.num_events and "time_start" in stream.meta
        for pngs, n in ((s.image_paths, 5), (s.image_1f_paths, 1)):
            for png, frame in zip(load_png_frames(pngs), render_frames(stream, n)):
                np.testing.assert_array_equal(png, frame)
    raw = np.load(samples[0].event_path, allow_pickle=True).item()
    assert raw["x"].dtype == np.uint16 and raw["t"].dtype == np.int64 and raw["p"].dtype == np.uint8
    entry = json.loads((root / JSON_NAME).read_text())[0]
    assert entry["split"] == "test" and entry["conversations"][0]["value"] == "<event>\nQ zero?"
    assert entry["event_data"] == f"{samples[0].event_path.parent.name}/000000.npy"


def test_write_synthetic_dataset_is_deterministic_and_refuses_existing_root(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 2, seed=5, config=SMALL, questions=["q"])
    b = write_synthetic_dataset(tmp_path / "b", 2, seed=5, config=SMALL, questions=["q"])
    for sa, sb in zip(discover_samples(a), discover_samples(b)):
        assert sa.event_path.read_bytes() == sb.event_path.read_bytes()
    with pytest.raises(EgptError, match="already exists"):
        write_synthetic_dataset(a, 2, seed=5, config=SMALL, questions=["q"])


def test_synthetic_dataset_caches_and_rebuilds_incomplete(tmp_path):
    root = synthetic_dataset(3, seed=0, config=SMALL, cache_dir=tmp_path)
    assert root.parent == tmp_path and "n3" in root.name and "s0" in root.name
    questions = load_questions()
    assert [s.query for s in discover_samples(root)] == questions[:3]
    stamp = (root / JSON_NAME).stat().st_mtime_ns
    assert synthetic_dataset(3, seed=0, config=SMALL, cache_dir=tmp_path) == root
    assert (root / JSON_NAME).stat().st_mtime_ns == stamp  # reused, not rewritten
    assert synthetic_dataset(3, seed=1, config=SMALL, cache_dir=tmp_path) != root

    next(root.glob("event_image/*/*_4.png")).unlink()  # damage the cache: it must be rebuilt
    assert synthetic_dataset(3, seed=0, config=SMALL, cache_dir=tmp_path) == root
    assert all(len(s.image_paths) == 5 and all(p.is_file() for p in s.image_paths) for s in discover_samples(root))


# ---------------------------------------------------------------- discover_samples


def test_discover_instruction_json_queries_and_paths(tmp_path):
    root = tmp_path / "ds"
    write_clip(root / "event_npy" / "seq_a" / "000000.npy")
    write_clip(root / "event_npy" / "seq_a" / "000001.npy")
    write_clip(root / "event_npy" / "seq_b" / "000002.npy")
    write_json(
        root,
        [
            {
                "id": "000000",
                "event_data": "seq_a/000000.npy",
                "event_image": [f"seq_a/000000_{k}.png" for k in range(5)],
                "event_image_1f": ["seq_a/000000_0.png"],
                "conversations": [
                    {"from": "human", "value": "<event>\n  What is the layout of the road?  "},
                    {"from": "gpt", "value": "A road."},
                ],
            },
            {"id": "000001", "event_data": "seq_a/000001.npy", "conversations": []},
            {
                "id": "000002",
                "event_data": "seq_b/000002.npy",
                "conversations": [{"from": "human", "value": " <event> "}],
            },
        ],
    )
    s0, s1, s2 = discover_samples(root)
    assert s0.query == "What is the layout of the road?"
    assert s0.event_path == root / "event_npy" / "seq_a" / "000000.npy"
    assert s0.image_paths == tuple(root / "event_image" / "seq_a" / f"000000_{k}.png" for k in range(5))
    assert s0.image_1f_paths == (root / "event_image_1f" / "seq_a" / "000000_0.png",)
    assert (s1.query, s1.image_paths, s1.image_1f_paths) == (DEFAULT_QUERY, (), ())
    assert s2.query == DEFAULT_QUERY
    assert [s.id for s in discover_samples(root, limit=2)] == ["000000", "000001"]


def test_discover_broken_json(tmp_path):
    write_json(tmp_path, '[{"id": "0", ')
    with pytest.raises(EgptError, match="does not parse") as e:
        discover_samples(tmp_path)
    assert JSON_NAME in str(e.value)


def test_discover_json_with_wrong_shape(tmp_path):
    write_json(tmp_path, {"id": "0", "event_data": "a.npy"})
    with pytest.raises(EgptError, match="'id' and 'event_data'"):
        discover_samples(tmp_path)
    write_json(tmp_path, [{"id": "0"}])
    with pytest.raises(EgptError, match="'id' and 'event_data'"):
        discover_samples(tmp_path)


def test_discover_json_pointing_at_missing_npy(tmp_path):
    write_json(tmp_path, [{"id": "0", "event_data": "seq/gone.npy", "conversations": []}])
    with pytest.raises(EgptError, match="does not exist") as e:
        discover_samples(tmp_path)
    assert str(tmp_path / "event_npy" / "seq" / "gone.npy") in str(e.value)


def test_discover_plain_npy_dir_recursive_sorted(tmp_path):
    write_clip(tmp_path / "b" / "2.npy")
    write_clip(tmp_path / "a.npy")
    write_clip(tmp_path / "b" / "1.npy")
    (tmp_path / "notes.txt").write_text("ignored")
    samples = discover_samples(tmp_path)
    assert [s.id for s in samples] == ["a", "b/1", "b/2"]
    assert all(s.query == DEFAULT_QUERY and s.image_paths == () and s.event_path.is_file() for s in samples)
    assert [s.id for s in discover_samples(tmp_path, limit=1)] == ["a"]


def test_discover_single_npy(tmp_path):
    clip = write_clip(tmp_path / "clip.npy")
    (s,) = discover_samples(clip)
    assert (s.id, s.event_path, s.query) == ("clip", clip, DEFAULT_QUERY)


@pytest.mark.parametrize("make", ["empty_dir", "missing", "other_file", "dir_without_clips"])
def test_discover_unusable_paths(tmp_path, make):
    target = tmp_path / "x"
    if make == "empty_dir":
        target.mkdir()
    elif make == "other_file":
        target = tmp_path / "x.txt"
        target.write_text("hello")
    elif make == "dir_without_clips":
        target.mkdir()
        (target / "readme.md").write_text("hi")
    with pytest.raises(EgptError) as e:
        discover_samples(target)
    msg = str(e.value)
    assert str(target) in msg and ".npy" in msg


def test_discover_rejects_bad_limit(tmp_path):
    with pytest.raises(EgptError, match="limit"):
        discover_samples(write_clip(tmp_path / "c.npy"), limit=0)
