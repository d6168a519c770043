"""An image over Pillow's pixel limit (a possible decompression bomb) is an unreadable image to the ResNet track's DALI
loader, which reads JPEG sizes from their headers: named, or skipped with ``on_bad_image: skip`` (one read by a loader
worker, through both entry points: tests/projector_kd/both_tracks/test_bombs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler
from torchvision import transforms as T

from imagenet import dali
from projector_kd.engine.data import CheckedImageFolder, DataError
from projector_kd.engine.sampling import resumable_loader

LIMIT = 1000  # PIL.Image.MAX_IMAGE_PIXELS for these tests: the 16 px images pass, 64 x 64 = 4096 is over twice it


@pytest.fixture
def pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)


def dali_train_loader(root, on_bad_image: str):
    """The entry point's training loader over ``root/train`` (batches of 8, seed 0) as the DALI loader reads it."""
    transform = T.Compose([T.RandomResizedCrop(16), T.RandomHorizontalFlip(0.5), T.ToTensor()])
    dataset = CheckedImageFolder(root / "train", transform=transform, on_bad_image=on_bad_image)
    loader = DataLoader(dataset, batch_size=8, sampler=RandomSampler(dataset), drop_last=True)
    return dali.DaliLoader(resumable_loader(loader, seed=0), torch.device("cpu"), True)


def test_a_jpeg_over_the_pixel_limit_is_named_or_skipped_by_the_dali_loader(
    tmp_path, pixel_limit, caplog, train_image_in_batch
):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(3):
            (tmp_path / split / f"class{label}").mkdir(parents=True)
            for index in range(10):
                pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / f"class{label}" / f"{index:02d}.jpg")
    big = train_image_in_batch(tmp_path, 1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)  # a complete JPEG: header size
    with pytest.raises(DataError) as error:
        list(dali_train_loader(tmp_path, "fail"))
    assert str(error.value).startswith(f"unreadable image {big} (DecompressionBombError: Image size (4096 pixels)")
    assert sum(len(labels) for _, labels, _ in dali_train_loader(tmp_path, "skip")) == 24
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert len(skips) == 1 and str(big) in skips[0]
