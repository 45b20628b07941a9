"""Hostile inputs (issue 14, item 1): no input file runs code, paths stay in the dataset, sizes are bounded."""

import io
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def _object_npy(path: Path, body: bytes) -> Path:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    path.write_bytes(buf.getvalue() + body)
    return path


def _crafted_object_field_clip() -> bytes:
    """A dict whose 'x' is built from a V8 dtype given, through BUILD, an object field at offset 0, then filled with
    the bytes 'AAAAAAAA': with dtype.__setstate__ honoured, freeing it decref'd the pointer 0x4141414141414141."""
    P = pickle

    def text(value: str) -> bytes:
        return P.BINUNICODE + struct.pack("<I", len(value)) + value.encode()

    def dtype(spec: str) -> bytes:
        return P.GLOBAL + b"numpy\ndtype\n" + text(spec) + P.NEWFALSE + P.NEWTRUE + P.TUPLE3 + P.REDUCE

    body = P.PROTO + b"\x02" + P.EMPTY_DICT + text("x")
    body += P.GLOBAL + b"numpy._core.multiarray\n_reconstruct\n" + P.GLOBAL + b"numpy\nndarray\n"
    body += P.BININT1 + b"\x00" + P.TUPLE1 + P.SHORT_BINBYTES + b"\x01b" + P.TUPLE3 + P.REDUCE
    body += P.MARK + P.BININT1 + b"\x01" + P.BININT1 + b"\x01" + P.TUPLE1 + dtype("V8")
    body += P.MARK + P.BININT1 + b"\x03" + text("|") + P.NONE + text("a") + P.TUPLE1
    body += P.EMPTY_DICT + text("a") + dtype("O") + P.BININT1 + b"\x00" + P.TUPLE2 + P.SETITEM
    body += P.BININT1 + b"\x08" + P.BININT1 + b"\x01" + P.BININT1 + b"\x09" + P.TUPLE + P.BUILD
    body += P.NEWFALSE + P.SHORT_BINBYTES + b"\x08" + b"A" * 8 + P.TUPLE + P.BUILD + P.SETITEM + P.STOP
    return body


def test_a_dtype_state_declaring_object_fields_is_refused_without_a_crash(tmp_path):
    path = _object_npy(tmp_path / "fields.npy", _crafted_object_field_clip())
    script = ("from egpt_speed.events import load_event_npy\nfrom egpt_speed.errors import EgptError\n"
              f"try:\n    load_event_npy({str(path)!r})\nexcept EgptError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # a segfault is -11
    assert "dtype state with fields" in done.stdout and "fields.npy" in done.stdout


def test_byte_order_of_pickled_arrays_survives_the_checked_build(tmp_path):
    record = clip_record() | {"x": clip_record()["x"].astype(">u2"), "t": np.arange(50, dtype=">i8")}
    loaded = load_event_npy(save_object(tmp_path / "big_endian.npy", record))
    np.testing.assert_array_equal(loaded.x, clip_record()["x"])
    np.testing.assert_array_equal(loaded.t, np.arange(50))


def test_a_deeply_nested_pickle_is_refused_before_unpickling(tmp_path):
    P = pickle  # a dict key nested 200,000 tuples deep: hashing it overflowed the C stack
    body = P.PROTO + b"\x02" + P.EMPTY_DICT + P.EMPTY_TUPLE + P.TUPLE1 * 200_000 + P.NONE + P.SETITEM + P.STOP
    with pytest.raises(EgptError, match="more than .* pickle opcodes"):
        load_event_npy(_object_npy(tmp_path / "deep.npy", body))


def test_memo_shared_nested_lists_are_refused_before_they_expand(tmp_path):
    P = pickle  # 9 levels of 10 references to the level below: ~400 bytes, 10**9 elements as an array
    body = P.PROTO + b"\x02" + P.EMPTY_DICT + P.BININT1 + b"\x01" + P.BINPUT + b"\x00" + P.POP
    for level in range(9):
        body += P.EMPTY_LIST + P.MARK + (P.BINGET + bytes([level])) * 10 + P.APPENDS + P.BINPUT + bytes([level + 1]) + P.POP
    for key in "xytp":
        body += P.BINUNICODE + struct.pack("<I", 1) + key.encode() + P.BINGET + b"\x09" + P.SETITEM
    body += P.STOP
    with pytest.raises(EgptError, match="not numpy arrays"):
        load_event_npy(_object_npy(tmp_path / "laughs.npy", body))


def test_a_plain_npy_declaring_more_data_than_it_holds_is_refused_before_allocating(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (10**11,)})
    path = tmp_path / "huge.npy"
    path.write_bytes(buf.getvalue() + b"\x00" * 64)
    with pytest.raises(EgptError, match="declares 800000000000 bytes of data but holds 64"):
        load_npy(path)


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


# ---------------------------------------------------------------- remote code in a user's dirs


def _remote_code_dir(root: Path, marker: Path) -> Path:
    """A dir whose tokenizer and model are custom classes in .py files that create `marker` when imported."""
    root.mkdir()
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (root / "tokenization_evil.py").write_text(payload)
    (root / "modeling_evil.py").write_text(payload)
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (root / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.C", "AutoModelForCausalLM": "modeling_evil.M"}}))
    return root


def test_a_checkpoint_tokenizer_with_custom_code_is_refused_even_if_the_user_says_yes(tmp_path, monkeypatch):
    from egpt_speed.tokenizers import load_checkpoint_tokenizer

    marker = tmp_path / "ran"
    folder = _remote_code_dir(tmp_path / "ckpt", marker)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # transformers asks on stdin when trust_remote_code is None
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(EgptError, match="could not load the tokenizer"):
        load_checkpoint_tokenizer(folder, None)
    assert not marker.exists()


def test_a_draft_dir_with_custom_code_is_refused_even_if_the_user_says_yes(tmp_path, monkeypatch):
    from egpt_speed.drafts import load_draft

    marker = tmp_path / "ran"
    folder = _remote_code_dir(tmp_path / "draft", marker)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(EgptError, match="custom code") as err:
        load_draft(str(folder), None, "tiny", torch.device("cpu"), torch.float32)
    assert "\n" not in str(err.value) and not marker.exists()
