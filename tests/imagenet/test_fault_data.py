"""Data faults: a corrupt image is named (on_bad_image: fail) after a resumable checkpoint, or skipped and counted
(skip); an empty class folder, an empty image file and val classes that differ from train are caught before any
training, naming the folder or file."""

from __future__ import annotations

import shutil

import pytest

from projector_kd.engine.checkpoint import load_checkpoint


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private, writable copy of the tiny ImageFolder."""
    return shutil.copytree(tiny_data, tmp_path / "data")


def test_corrupt_image_is_named_with_fail(make_recipe, data, cli_error, tmp_path, train_image_in_batch):
    bad = train_image_in_batch(data, 1)  # after a trained step: a checkpoint is written first
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    line = cli_error("--config", make_recipe("run", method="baseline", data_root=data), "--seed", "0")
    assert line.startswith(f"error: unreadable image {bad} (UnidentifiedImageError: ")
    assert "— fix or delete the file, or set on_bad_image: skip. A resumable checkpoint was written first: " in line


def test_corrupt_image_is_skipped_and_counted_with_skip(make_recipe, data, cli, tmp_path, caplog, train_image_in_batch):
    bad = train_image_in_batch(data, 1)  # one the seeded run reads (drop_last leaves some out)
    bad.write_bytes(b"")
    status, _, err = cli(
        "--config", make_recipe("run", method="baseline", data_root=data, on_bad_image="skip"), "--seed", "0"
    )
    assert status == 0, err
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert len(skips) == 1 and str(bad) in skips[0] and skips[0].endswith("(1 skipped so far in this process)")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"skipping unreadable image {bad}" in log


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_class_folder_is_caught_before_training(make_recipe, data, cli_error, tmp_path, split):
    empty = data / split / "class2"
    for image in empty.iterdir():
        image.unlink()
    line = cli_error("--config", make_recipe("run", method="baseline", data_root=data))
    assert line == (
        f"error: class folder {empty} holds no images (.jpg, .jpeg, .png, .ppm, ...) — add images or remove the folder"
    )
    assert not (tmp_path / "run").exists()  # caught before the run folder is written


def test_val_classes_differing_from_train_are_caught_before_training(make_recipe, data, cli_error, tmp_path):
    (data / "val" / "class2").rename(data / "val" / "class9")
    line = cli_error("--config", make_recipe("run", method="baseline", data_root=data))
    assert line == (
        f"error: classes of {data / 'val'} differ from {data / 'train'}: missing ['class2'], "
        f"extra ['class9'] — both splits need the same class folders"
    )
    assert not (tmp_path / "run").exists()


def test_empty_image_is_caught_before_any_work(make_recipe, data, cli_error, tmp_path):
    empty = data / "val" / "class0" / "02.png"
    empty.write_bytes(b"")
    line = cli_error("--config", make_recipe("run", method="baseline", data_root=data))
    assert line == (f"error: image {empty} is empty (0 bytes) — replace or delete it, or set on_bad_image: skip")
    assert not (tmp_path / "run").exists()


def test_image_unreadable_mid_epoch_costs_no_work(make_recipe, data, cli, tmp_path, break_image_on_read, cli_error):
    """The 20th image read (in the 3rd batch of 8) turns out unreadable: a resumable checkpoint after the 2 trained
    steps comes before the one error line; with the file fixed, the same command continues from there."""
    broken = break_image_on_read(20, b"\x89PNG\r\n\x1a\n truncated")
    recipe = make_recipe("run", method="baseline", data_root=data)
    line = cli_error("--config", recipe, "--seed", "0")
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    assert line.startswith(f"error: unreadable image {broken.path} (")
    assert line.endswith(
        f"A resumable checkpoint was written first: {checkpoint} (epoch 0, step 2) — after fixing "
        f"the file, run the same command again to continue"
    )
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)

    broken.repair()
    status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == 0, err
    assert f"resuming from {checkpoint} at epoch 0 step 2" in (tmp_path / "run" / "log.txt").read_text()
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["global_step"]) == (1, 3)
