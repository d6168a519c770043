"""Data faults are caught before training (layout) or name the file (unreadable image; fail or skip)."""

from __future__ import annotations

import json
import shutil

import pytest

from deit.main import main
from projector_kd.engine.data import DataError


def test_missing_folder_and_split_name_the_expected_layout(tmp_path, train_argv, data_copy):
    missing = tmp_path / "imagenet"
    with pytest.raises(DataError, match=f"dataset folder {missing} does not exist — expected {missing}/train/"):
        main(train_argv(tmp_path / "out", "--epochs", "1", data=missing))
    shutil.rmtree(data_copy / "val")
    with pytest.raises(DataError, match=f"dataset split folder {data_copy / 'val'} is missing"):
        main(train_argv(tmp_path / "out", "--epochs", "1", data=data_copy))
    assert not (tmp_path / "out").exists()


def test_empty_class_and_differing_classes_are_caught_before_training(tmp_path, train_argv, data_copy):
    (data_copy / "train" / "class3").mkdir()
    with pytest.raises(DataError, match=f"class folder {data_copy / 'train' / 'class3'} holds no images"):
        main(train_argv(tmp_path / "out", "--epochs", "1", data=data_copy))
    (data_copy / "train" / "class3").rmdir()
    (data_copy / "val" / "class2").rename(data_copy / "val" / "class9")
    with pytest.raises(
        DataError,
        match=r"classes of .*val differ from .*train: missing \['class2'\], extra "
        r"\['class9'\]",
    ):
        main(train_argv(tmp_path / "out", "--epochs", "1", data=data_copy))


def test_num_classes_mismatch_is_named(tmp_path, train_argv, image_folder):
    with pytest.raises(
        DataError,
        match=r"train has 3 class folders but model.num_classes = 5; "
        r"set --opts model.num_classes 3",
    ):
        main(train_argv(tmp_path / "out", "--opts", "model.num_classes", "5"))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_fails_naming_the_file(tmp_path, train_argv, data_copy, workers):
    bad = data_copy / "train" / "class1" / "3.png"
    bad.write_bytes(b"not an image at all")
    argv = train_argv(tmp_path / "out", "--epochs", "1", data=data_copy) + ["--opts", "data.num_workers", workers]
    with pytest.raises(DataError) as error:
        main(argv)
    message = str(error.value)
    assert message.startswith(f"unreadable image {bad} (UnidentifiedImageError") and "\n" not in message


def test_corrupt_image_skip_mode_counts_and_trains(tmp_path, train_argv, data_copy):
    bad = data_copy / "train" / "class1" / "3.png"
    bad.write_bytes(b"\x89PNG truncated")
    output = tmp_path / "out"
    assert main(train_argv(output, "--epochs", "1", data=data_copy) + ["--opts", "data.on_bad_image", "skip"]) == 0
    log = (output / "log.txt").read_text()
    assert f"skipping unreadable image {bad}" in log and "(1 skipped so far in this process)" in log
    assert len(json.loads((output / "metrics.json").read_text())["val_top1_per_epoch"]) == 1
