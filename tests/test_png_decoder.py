"""--source png (issue 13 item 2): PNG frames decoded by torchvision/OpenCV where installed are PIL's pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from egpt_speed import events
from egpt_speed.errors import EgptError
from egpt_speed.events import MAX_SENSOR_SIDE, load_png_frames, png_decoder_name, save_png


def pil_pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def event_like(seed: int, hw=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    palette = np.array([[255, 255, 255], [0, 0, 255], [255, 0, 0]], dtype=np.uint8)
    img = palette[rng.integers(0, 3, hw)]
    img[::7] = rng.integers(0, 256, (img[::7].shape), dtype=np.uint8)  # some arbitrary colours too
    return img


def test_the_decoder_in_use_is_named():
    assert png_decoder_name() in ("torchvision", "opencv", "pil")


@pytest.mark.parametrize("module", ["cv2", "torchvision"])
def test_a_fast_decoder_gives_pils_pixels(module, tmp_path, monkeypatch):
    pytest.importorskip(module)
    make = {"cv2": events._opencv_decoder, "torchvision": events._torchvision_decoder}[module]
    monkeypatch.setattr(events, "fast_png_decoder", make)
    paths = []
    for seed, hw in enumerate([(48, 64), (480, 640), (1, 5), (33, 17)]):
        paths.append(tmp_path / f"{seed}.png")
        save_png(event_like(seed, hw), paths[-1])
    for path, got in zip(paths, load_png_frames(paths)):
        assert got.dtype == np.uint8 and got.shape[2] == 3
        assert np.array_equal(got, pil_pixels(path))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_other_png_kinds_go_through_pil(mode, tmp_path):
    img = Image.fromarray(event_like(1)).convert(mode if mode != "I;16" else "I").convert(mode) if mode != "P" \
        else Image.fromarray(event_like(1)).quantize(8)
    path = tmp_path / "f.png"
    img.save(path)
    assert events._png_header(path.read_bytes())[2] is False
    assert np.array_equal(load_png_frames([path])[0], pil_pixels(path))


def test_an_oversized_frame_is_refused_from_its_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (MAX_SENSOR_SIDE + 1, 2)).save(path)
    with pytest.raises(EgptError, match="beyond the"):
        load_png_frames([path])


def test_a_corrupt_png_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.png"
    good = tmp_path / "good.png"
    save_png(event_like(0), good)
    path.write_bytes(good.read_bytes()[:60])
    with pytest.raises(EgptError, match="cannot be read"):
        load_png_frames([path])
