"""What can be known before training is checked before training: a last batch that would hold 1 image per process
under batch whitening (dataset size, batch size, world size, drop_last)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("key", ["train.train_data_loader", "train.train_data_loader.batch_sampler"])
def test_last_batch_of_one_image_is_refused_before_training(make_recipe, teacher_ckpt, cli, tmp_path, key):
    batch_sampler = key.endswith(".batch_sampler")
    recipe = make_recipe("run", teacher_ckpt=teacher_ckpt, batch_size=29, batch_sampler=batch_sampler)
    status, _, err = cli("--config", recipe, "--opts", f"{key}.kwargs.drop_last", "false")
    assert status == 2
    assert err == (
        f"error: {recipe}: {key}: 30 training images over 1 process give 30 per "
        f"process, so batches of 29 leave a last batch of 1 image, which batch whitening cannot train on — "
        f"set drop_last: true in {key}.kwargs (or choose a batch size that does not "
        f"leave 1 image)\n"
    )
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_last_batch_of_two_images_trains(make_recipe, teacher_ckpt, cli, tmp_path):
    recipe = make_recipe("run", teacher_ckpt=teacher_ckpt, batch_size=28)
    status, _, err = cli("--config", recipe, "--opts", "train.train_data_loader.kwargs.drop_last", "false")
    assert status == 0, err
