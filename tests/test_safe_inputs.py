"""Hostile inputs (issue 14, item 1): no input file runs code, paths stay in the dataset, sizes are bounded."""

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from egpt_speed.datasets import discover_samples, resolve_samples
from egpt_speed.errors import EgptError
from egpt_speed.events import EventStream, load_event_npy, render_frames
from egpt_speed.safe_load import MAX_NPY_HEADER_BYTES, load_npy

JSON_NAME = "EventGPT_Instruction_Subset.json"


def clip_record(n: int = 50, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.integers(0, 64, n).astype(np.uint16),
        "y": rng.integers(0, 48, n).astype(np.uint16),
        "t": np.arange(n, dtype=np.int64),
        "p": rng.integers(0, 2, n).astype(np.uint8),
        "time_start": np.int64(7),
        "image_indices_in_clip": [1, 2],
    }


class TouchMarker:
    """Unpickling this calls eval, which creates `marker` and (with `clip`) evaluates to a valid clip dict."""

    def __init__(self, marker: Path, clip: bool):
        self.marker, self.clip = marker, clip

    def __reduce__(self):
        body = ("{k: __import__('numpy').arange(50, dtype='uint16') for k in 'xytp'}" if self.clip else "None")
        return eval, (f"(open({str(self.marker)!r}, 'w').close(), {body})[1]",)


def save_object(path: Path, obj) -> Path:
    np.save(path, np.array(obj, dtype=object) if not isinstance(obj, dict) else obj, allow_pickle=True)
    return path


# ---------------------------------------------------------------- code execution


@pytest.mark.parametrize("returns_clip", [False, True])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, returns_clip):
    marker = tmp_path / "ran"
    path = save_object(tmp_path / "evil.npy", TouchMarker(marker, returns_clip))
    with pytest.raises(EgptError, match="builtins.eval") as err:
        load_event_npy(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    # Control: numpy's own loader does run it (so the file really is hostile) and, for the variant, yields a clip.
    loaded = np.load(path, allow_pickle=True).item()
    assert marker.exists()
    assert (sorted(loaded) == ["p", "t", "x", "y"]) if returns_clip else loaded is None


def test_malicious_object_inside_a_valid_clip_dict_is_refused(tmp_path):
    marker = tmp_path / "ran"
    record = clip_record() | {"extra": TouchMarker(marker, clip=False)}
    with pytest.raises(EgptError, match="refused without running it"):
        load_event_npy(save_object(tmp_path / "evil.npy", record))
    assert not marker.exists()


def test_bare_pickle_with_a_reduce_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npy"
    path.write_bytes(pickle.dumps(TouchMarker(marker, clip=True)))
    with pytest.raises(EgptError, match="evil.npy"):
        load_event_npy(path)
    assert not marker.exists()


def test_ndarray_constructor_cannot_be_called_directly(tmp_path):
    path = tmp_path / "alloc.npy"
    # REDUCE numpy.ndarray((1 << 40,)): a huge allocation if the class itself were handed out.
    path.write_bytes(b"\x80\x02cnumpy\nndarray\n(J\x00\x00\x00\x01\x85tR.")
    with pytest.raises(EgptError, match="not a readable .npy"):
        load_npy(path)


def test_numpy1_and_protocol2_pickles_still_load(tmp_path):
    record = clip_record()
    boxed = np.empty((), dtype=object)
    boxed[()] = record
    stream = pickle.dumps(boxed, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in stream  # written as numpy 1.x wrote it
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    path = tmp_path / "old.npy"
    path.write_bytes(buf.getvalue() + stream)
    loaded = load_event_npy(path)
    np.testing.assert_array_equal(loaded.x, record["x"])
    np.testing.assert_array_equal(loaded.t, record["t"])
    assert loaded.meta == {"time_start": 7}


def test_oversized_npy_header_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "big_header.npy"
    declared = 64 << 20
    path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", declared) + b"{" + b" " * 100)
    with pytest.raises(EgptError, match=f"{declared}-byte .npy header \\(limit {MAX_NPY_HEADER_BYTES}\\)"):
        load_event_npy(path)


# ---------------------------------------------------------------- sizes and timestamps


def test_coordinates_beyond_the_sensor_bound_are_refused_with_the_reason(tmp_path):
    record = clip_record()
    record["x"][3] = 65535
    path = save_object(tmp_path / "wide.npy", record)
    with pytest.raises(EgptError, match="'x' up to 65535, beyond the sensor bound 4095"):
        load_event_npy(path)
    assert load_event_npy(path, max_coordinate=65535).x.max() == 65535  # the bound is a parameter


def test_renderer_refuses_a_frame_beyond_the_bound_before_allocating():
    n = 10
    stream = EventStream(x=np.full(n, 65535, np.uint16), y=np.full(n, 65535, np.uint16),
                         t=np.arange(n, dtype=np.int64), p=np.ones(n, np.uint8))
    with pytest.raises(EgptError, match="65536x65536 pixels exceeds the 4096-pixel sensor bound"):
        render_frames(stream, 1)


def test_unsorted_and_negative_timestamps_are_recorded_as_warnings(tmp_path):
    record = clip_record()
    record["t"] = record["t"][::-1].copy() - 10  # decreasing, the first 10 negative
    stream = load_event_npy(save_object(tmp_path / "odd_t.npy", record))
    assert len(stream.warnings) == 2
    assert "10 negative timestamp(s)" in stream.warnings[0] and "odd_t.npy" in stream.warnings[0]
    assert "not sorted (49 decreasing step(s))" in stream.warnings[1]
    assert load_event_npy(save_object(tmp_path / "fine.npy", clip_record())).warnings == ()


# ---------------------------------------------------------------- dataset paths


def write_dataset(root: Path, event_data: str, images: list[str] | None = None) -> Path:
    (root / "event_npy").mkdir(parents=True, exist_ok=True)
    save_object(root / "event_npy" / "a.npy", clip_record())
    entry = {"id": "s0", "event_data": event_data, "conversations": []}
    if images is not None:
        entry["event_image"] = images
    (root / JSON_NAME).write_text(json.dumps([entry]))
    return root


@pytest.mark.parametrize("event_data", ["/etc/passwd", "../../outside.npy", "a/../../../outside.npy"])
def test_event_paths_escaping_the_dataset_are_refused(tmp_path, event_data):
    root = write_dataset(tmp_path / "ds", event_data)
    with pytest.raises(EgptError, match="points outside the dataset dir.*--allow-paths-outside-data") as err:
        discover_samples(root)
    assert "s0" in str(err.value) and event_data in str(err.value)


def test_image_paths_escaping_the_dataset_are_refused(tmp_path):
    root = write_dataset(tmp_path / "ds", "a.npy", images=["ok_0.png", "../../../x.png"])
    with pytest.raises(EgptError, match="event_image '../../../x.png' points outside"):
        discover_samples(root)


def test_paths_inside_the_dataset_and_allowed_escapes_resolve(tmp_path):
    root = write_dataset(tmp_path / "ds", "sub/../a.npy")
    assert discover_samples(root)[0].event_path == root / "event_npy" / "a.npy"
    outside = save_object(tmp_path / "outside.npy", clip_record())
    root2 = write_dataset(tmp_path / "ds2", str(outside))
    (spec,) = discover_samples(root2, allow_outside=True)
    assert spec.event_path == outside
    (spec,) = resolve_samples(str(root2), 1, 0, 0, 10, tmp_path / "cache", allow_outside=True)
    assert load_event_npy(spec.event_path).num_events == 50
    with pytest.raises(EgptError, match="points outside"):
        resolve_samples(str(root2), 1, 0, 0, 10, tmp_path / "cache")
