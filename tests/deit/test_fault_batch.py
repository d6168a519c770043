"""What can be known before training is checked before training: a batch of 1 image, which the projector's batch
whitening cannot train on."""

from __future__ import annotations

import pytest

from deit.main import main
from projector_kd.engine.errors import UserError


def test_batch_of_one_without_mixup_is_refused_before_any_work(tmp_path, train_argv):
    argv = train_argv(tmp_path / "run", "--batch-size", "1", "--opts", "aug.mixup", "0.0", "aug.cutmix", "0.0")
    with pytest.raises(UserError) as error:
        main(argv)
    assert str(error.value) == (
        "data.batch_size = 1: the projector's batch whitening needs at least 2 images per "
        "process in each (micro-)batch — set --batch-size 2 or more"
    )
    assert not (tmp_path / "run").exists()


def test_batch_of_one_trains_without_the_projector(tmp_path, train_argv):
    argv = train_argv(
        tmp_path / "run",
        "--batch-size",
        "1",
        "--epochs",
        "1",
        "--opts",
        "aug.mixup",
        "0.0",
        "aug.cutmix",
        "0.0",
        "distillation.method",
        "kd",
        "data.eval_batch_size",
        "12",
    )
    assert main(argv) == 0
