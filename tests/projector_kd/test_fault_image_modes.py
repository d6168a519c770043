"""Images of every mode Pillow opens load as the RGB they show (16-bit greyscale used to come out blank white); a float
image whose scale cannot be told (values in [0, 1], which would load black) is refused, naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from projector_kd.engine.data import DataError, load_rgb

GREY = [0, 1, 128, 255]
RGBA_PIXELS = [(200, 10, 20, 255), (200, 10, 20, 0), (0, 0, 0, 128), (10, 20, 30, 255)]


def _save(tmp_path, image: Image.Image, name: str, **kwargs) -> str:
    path = tmp_path / name
    image.save(path, **kwargs)
    return str(path)


def _grey(values, mode: str) -> Image.Image:
    image = Image.fromarray(
        np.array([values], dtype={"L": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    )
    assert image.mode == mode
    return image


def _pixels(path: str) -> list:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image).reshape(-1, 3).tolist()


def _expected_grey(values) -> list:
    return [[v, v, v] for v in values]


def test_mode_1(tmp_path):
    image = Image.fromarray(np.array([[0, 255, 255, 0]], dtype=np.uint8)).convert("1")
    assert _pixels(_save(tmp_path, image, "a.png")) == _expected_grey([0, 255, 255, 0])


def test_mode_L(tmp_path):
    assert _pixels(_save(tmp_path, _grey(GREY, "L"), "a.png")) == _expected_grey(GREY)


def test_16_bit_greyscale_png_is_not_blank(tmp_path):
    path = _save(tmp_path, _grey([0, 257, 128 * 257, 65535], "I;16"), "a.png")
    assert Image.open(path).mode == "I;16"
    assert _pixels(path) == _expected_grey([0, 1, 128, 255])


def test_16_bit_greyscale_rounds_to_the_nearest_8_bit_value(tmp_path):
    path = _save(tmp_path, _grey([128, 129, 1000, 65400], "I;16"), "a.png")
    assert _pixels(path) == _expected_grey([0, 1, 4, 254])


def test_mode_I_is_on_the_16_bit_scale(tmp_path):
    path = _save(tmp_path, _grey([-5, 257, 128 * 257, 70000], "I"), "a.tif")
    assert Image.open(path).mode == "I"
    assert _pixels(path) == _expected_grey([0, 1, 128, 255])


def test_mode_F_is_on_the_8_bit_scale(tmp_path):
    path = _save(tmp_path, _grey([-3.0, 0.6, 127.7, 300.0], "F"), "a.tif")
    assert Image.open(path).mode == "F"
    assert _pixels(path) == _expected_grey([0, 1, 128, 255])


def test_LA_is_composited_over_white(tmp_path):
    image = Image.fromarray(np.array([[[100, 255], [100, 0], [0, 128], [50, 255]]], dtype=np.uint8), "LA")
    assert _pixels(_save(tmp_path, image, "a.png")) == _expected_grey([100, 255, 127, 50])


def test_RGBA_is_composited_over_white(tmp_path):
    image = Image.fromarray(np.array([RGBA_PIXELS], dtype=np.uint8), "RGBA")
    assert _pixels(_save(tmp_path, image, "a.png")) == [[200, 10, 20], [255, 255, 255], [127, 127, 127], [10, 20, 30]]


def _palette_image() -> Image.Image:
    image = Image.fromarray(np.array([[0, 1, 2, 1]], dtype=np.uint8), "P")
    image.putpalette([200, 10, 20, 0, 0, 0, 10, 200, 30] + [0] * (253 * 3))
    return image


def test_palette_without_transparency(tmp_path):
    assert _pixels(_save(tmp_path, _palette_image(), "a.png")) == [[200, 10, 20], [0, 0, 0], [10, 200, 30], [0, 0, 0]]


def test_palette_with_a_transparent_index_shows_white_there(tmp_path):
    path = _save(tmp_path, _palette_image(), "a.png", transparency=1)
    assert Image.open(path).mode == "P"
    assert _pixels(path) == [[200, 10, 20], [255, 255, 255], [10, 200, 30], [255, 255, 255]]


def test_greyscale_with_a_transparent_value_shows_white_there(tmp_path):
    path = _save(tmp_path, _grey([0, 7, 128, 7], "L"), "a.png", transparency=7)
    assert _pixels(path) == _expected_grey([0, 255, 128, 255])


@pytest.mark.parametrize("name", ["a.jpg", "a.tif"])
def test_CMYK(tmp_path, name):
    image = Image.fromarray(
        np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]], dtype=np.uint8), "CMYK"
    )
    path = _save(tmp_path, image, name, **({"quality": 100} if name.endswith("jpg") else {}))
    assert Image.open(path).mode == "CMYK"
    expected = np.array([[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]])
    assert np.abs(np.array(_pixels(path)) - expected).max() <= (8 if name.endswith("jpg") else 0)


@pytest.mark.parametrize("values", [[0.0, 0.25, 0.5, 1.0], [-0.5, 0.0, 0.3, 0.9]])
def test_mode_F_on_a_0_to_1_scale_is_refused_naming_the_file(tmp_path, values):
    path = _save(tmp_path, _grey(values, "F"), "a.tif")
    with pytest.raises(DataError) as error:
        load_rgb(path)
    assert str(error.value) == (
        f"unreadable image {path} (ValueError: a 32-bit float (mode F) image with every value in [0, 1]: float images "
        "are read on the 0..255 scale, where it would be black — save it as 8-bit (values x 255) or 16-bit (values x "
        "65535)) — fix or delete the file, or set on_bad_image: skip"
    )


def test_mode_F_with_nan_is_refused_and_all_black_loads(tmp_path):
    with pytest.raises(DataError, match=r"\(ValueError: a 32-bit float \(mode F\) image with NaN or infinite values"):
        load_rgb(_save(tmp_path, _grey([0.0, float("nan"), 3.0, 4.0], "F"), "nan.tif"))
    assert _pixels(_save(tmp_path, _grey([0.0, 0.0, 0.0, 0.0], "F"), "black.tif")) == _expected_grey([0, 0, 0, 0])
