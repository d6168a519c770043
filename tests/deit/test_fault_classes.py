"""The number of classes is checked against the class folders before any work; hidden folders (names starting with
a dot) are never classes."""

from __future__ import annotations

import json
import shutil

import pytest

from deit.main import main
from projector_kd.engine.data import DataError


def test_num_classes_differing_from_the_class_folders_is_refused_before_any_work(tmp_path, train_argv, image_folder):
    with pytest.raises(DataError) as error:
        main(train_argv(tmp_path / "run", "--opts", "model.num_classes", "5"))
    assert str(error.value) == (
        f"{image_folder / 'train'} has 3 class folders but model.num_classes = 5; set --opts "
        f"model.num_classes 3 or point --data-path at the right folder"
    )
    assert not (tmp_path / "run").exists()


def test_hidden_folders_are_not_classes(tmp_path, train_argv, data_copy):
    for split in ("train", "val"):
        shutil.copytree(data_copy / split / "class0", data_copy / split / ".ipynb_checkpoints")
    assert main(train_argv(tmp_path / "run", "--epochs", "1", data=data_copy)) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["val_top1_per_epoch"]) == 1
    assert "checkpoint.pth" in {p.name for p in (tmp_path / "run").iterdir()}
