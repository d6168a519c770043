"""An image over Pillow's pixel limit (a possible decompression bomb) met in the middle of an epoch, read by a loader
worker, is an unreadable image: a resumable checkpoint first, then one line naming the file."""

from __future__ import annotations

from PIL import Image
from torchvision.datasets import ImageFolder

from projector_kd.engine.sampling import ResumableSampler


def test_an_image_over_the_pixel_limit_read_by_a_worker_is_named_after_a_checkpoint(
    tmp_path, train_argv, data_copy, cli, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 16 px images pass; 40 x 40 is over (Pillow warns)
    files = ImageFolder(str(data_copy / "train")).samples
    big = files[ResumableSampler(len(files), 4, 0).epoch_indices(0)[8]][0]  # in the 3rd batch of 4
    Image.new("RGB", (40, 40), (200, 40, 40)).save(big)
    output = tmp_path / "run"
    status, err = cli(train_argv(output, "--epochs", "1", "--opts", "data.num_workers", "1", data=data_copy))
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(
        f"error: unreadable image {big} (DecompressionBombWarning: Image size (1600 pixels) exceeds limit of 1000 "
        "pixels, could be decompression bomb DOS attack.) — shrink the file below Pillow's pixel limit"
    )
    assert lines[0].endswith(
        f"A resumable checkpoint was written first: {output / 'checkpoint.pth'} (epoch 0, step 2) — after fixing the "
        "file, run the same command again to continue"
    )
