"""An image over Pillow's pixel limit (a possible decompression bomb) read by a loader worker is an unreadable image,
through both entry points: met in the middle of an epoch, a resumable checkpoint first, then one line naming the file;
with ``on_bad_image: skip``, skipped and named in the log."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

LIMIT = 1000  # PIL.Image.MAX_IMAGE_PIXELS for these tests: the 16 px images pass


@pytest.fixture
def data(track, tmp_path, monkeypatch) -> Path:
    """A private, writable copy of the track's images, read under a pixel limit of :data:`LIMIT`."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    return shutil.copytree(track.images, tmp_path / "data")


def test_an_image_over_the_pixel_limit_read_by_a_worker_is_named_after_a_checkpoint(
    track, tmp_path, data, one_error_line
):
    big = track.first_image_of_batch(data, 2)
    Image.new("RGB", (40, 40), (200, 40, 40)).save(big)  # 1600 pixels: over the limit, under twice it (Pillow warns)
    output = tmp_path / "run"
    line = one_error_line(track.run(track.argv(output, workers=1, data=data)))
    assert line.startswith(
        f"error: unreadable image {big} (DecompressionBombWarning: Image size (1600 pixels) exceeds limit of 1000 "
        "pixels, could be decompression bomb DOS attack.) — shrink the file below Pillow's pixel limit"
    )
    assert line.endswith(
        f"A resumable checkpoint was written first: {output / 'checkpoint.pth'} (epoch 0, step 2) — after fixing the "
        "file, run the same command again to continue"
    )


def test_an_image_over_the_pixel_limit_is_skipped_and_named_by_a_worker(track, tmp_path, data):
    big = track.first_image_of_batch(data, 1)
    Image.new("RGB", (64, 64)).save(big)  # 4096 pixels: over twice the limit (Pillow refuses)
    track.train(tmp_path / "run", workers=1, data=data, skip_bad_images=True)
    assert (
        f"skipping unreadable image {big} (DecompressionBombError: Image size (4096 pixels) exceeds limit of "
        in (tmp_path / "run" / "log.txt").read_text()
    )
