"""Data faults: a corrupt image is named (on_bad_image: fail) or skipped and counted (skip); an empty class folder
and val classes that differ from train are caught before any training, naming the folder."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private, writable copy of the tiny ImageFolder."""
    return shutil.copytree(tiny_data, tmp_path / "data")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_corrupt_image_is_named_with_fail(make_recipe, data, cli, tmp_path):
    bad = data / "train" / "class1" / "03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    status, _, err = cli("--config", make_recipe("run", method="baseline", data_root=data))
    assert status == 2
    line = _one_line(err)
    assert line.startswith(f"error: unreadable image {bad} (UnidentifiedImageError: ")
    assert line.endswith("— fix or delete the file, or set on_bad_image: skip")
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_corrupt_image_is_skipped_and_counted_with_skip(make_recipe, data, cli, tmp_path, caplog):
    bad = data / "train" / "class1" / "03.png"
    bad.write_bytes(b"")
    status, _, err = cli("--config", make_recipe("run", method="baseline", data_root=data, on_bad_image="skip"))
    assert status == 0, err
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert len(skips) == 1 and str(bad) in skips[0] and skips[0].endswith("(1 skipped so far in this process)")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"skipping unreadable image {bad}" in log


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_class_folder_is_caught_before_training(make_recipe, data, cli, tmp_path, split):
    empty = data / split / "class2"
    for image in empty.iterdir():
        image.unlink()
    status, _, err = cli("--config", make_recipe("run", method="baseline", data_root=data))
    assert status == 2
    assert _one_line(err) == (f"error: class folder {empty} holds no images (.jpg, .jpeg, .png, .ppm, ...) — add "
                              f"images or remove the folder")
    assert not (tmp_path / "run").exists()  # caught before the run folder is written


def test_val_classes_differing_from_train_are_caught_before_training(make_recipe, data, cli, tmp_path):
    (data / "val" / "class2").rename(data / "val" / "class9")
    status, _, err = cli("--config", make_recipe("run", method="baseline", data_root=data))
    assert status == 2
    assert _one_line(err) == (f"error: classes of {data / 'val'} differ from {data / 'train'}: missing ['class2'], "
                              f"extra ['class9'] — both splits need the same class folders")
    assert not (tmp_path / "run").exists()
