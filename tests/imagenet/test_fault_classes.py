"""The networks' number of classes is checked against the class folders before any work; hidden folders (names
starting with a dot) are never classes."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private, writable copy of the tiny ImageFolder."""
    return shutil.copytree(tiny_data, tmp_path / "data")


@pytest.mark.parametrize("method, key", [("baseline", "student_model"), ("teacher", "student_model")])
def test_num_classes_differing_from_the_class_folders_is_refused_before_any_work(
    make_recipe, cli, tmp_path, data, method, key
):
    status, _, err = cli("--config", make_recipe("run", method=method, data_root=data, num_classes=5))
    assert status == 2
    assert err == (
        f"error: {data / 'train'} has 3 class folders but models.{key} num_classes = 5; set --opts "
        f"models.{key}.kwargs.num_classes 3 (a teacher checkpoint must match too) or point --data-root at "
        f"the right folder\n"
    )
    assert not (tmp_path / "run").exists()


def test_hidden_folders_are_not_classes(make_recipe, cli, tmp_path, data):
    for split in ("train", "val"):
        hidden = data / split / ".ipynb_checkpoints"
        shutil.copytree(data / split / "class0", hidden)
    status, _, err = cli("--config", make_recipe("run", method="baseline", data_root=data), "--seed", "0")
    assert status == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["val_top1_per_epoch"]) == 1
    # 21 val images in 3 classes, the 7 hidden copies not counted: accuracy is a multiple of 100/21
    assert round(metrics["top1"] * 21 / 100, 6) == round(metrics["top1"] * 21 / 100)
