"""Images over Pillow's pixel limit (possible decompression bombs) are unreadable images: named in one line, skipped
with ``on_bad_image: skip``, also when a loader worker reads them; between the limit and twice it (where Pillow only
warns) as well as above (where it raises)."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from projector_kd.engine.data import CheckedImageFolder, DataError, load_rgb, raise_worker_errors_plainly

LIMIT = 1000  # PIL.Image.MAX_IMAGE_PIXELS for these tests: 40 x 40 = 1600 warns, 64 x 64 = 4096 is an error


@pytest.fixture
def pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)


def make_split(root, big_side: int):
    """Two classes of 16 px images; ``a/1.png`` is ``big_side`` px square."""
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(2):
            side = big_side if (name, index) == ("a", 1) else 16
            Image.new("RGB", (side, side), (index * 40, 0, 0)).save(root / name / f"{index}.png")
    return root


@pytest.mark.parametrize("side, kind", [(40, "DecompressionBombWarning"), (64, "DecompressionBombError")])
def test_an_image_over_the_pixel_limit_is_unreadable_and_named(tmp_path, pixel_limit, side, kind):
    split = make_split(tmp_path / "train", side)
    big = split / "a" / "1.png"
    filters = list(warnings.filters)
    with pytest.raises(DataError) as error:
        load_rgb(str(big))
    limit = LIMIT if side == 40 else 2 * LIMIT
    assert str(error.value) == (
        f"unreadable image {big} ({kind}: Image size ({side * side} pixels) exceeds limit of {limit} pixels, could be "
        "decompression bomb DOS attack.) — shrink the file below Pillow's pixel limit (PIL.Image.MAX_IMAGE_PIXELS) or "
        "delete it, or set on_bad_image: skip"
    )
    assert warnings.filters == filters  # the process's warning filters are left as they were
    assert load_rgb(str(split / "a" / "0.png")).size == (16, 16)


@pytest.mark.parametrize("side", [40, 64])
def test_an_image_over_the_pixel_limit_is_skipped_and_named_by_a_loader_worker(tmp_path, pixel_limit, side):
    split = make_split(tmp_path / "train", side)
    skipping = CheckedImageFolder(split, transform=lambda image: torch.tensor(image.size), on_bad_image="skip")
    labels = [skipping[index][1] for index in range(len(skipping))]
    assert labels == [0, 1, 1, 1] and skipping.skipped == {1}  # a/1.png is replaced by the next readable, b/0.png
    failing = CheckedImageFolder(split, transform=lambda image: torch.tensor(image.size))
    loader = torch.utils.data.DataLoader(failing, batch_size=2, num_workers=1)
    with pytest.raises(DataError, match=f"^unreadable image {split / 'a' / '1.png'} \\(DecompressionBomb"):
        list(raise_worker_errors_plainly(loader, "training"))
