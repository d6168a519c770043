"""Data faults through both entry points: hidden folders (names starting with a dot) are never classes; an empty class
folder, an empty image file and val classes that differ from train are caught before any work, naming the folder or
file; a corrupt image is named (on_bad_image: fail) after a resumable checkpoint, or skipped and counted (skip); an
image that turns out unreadable in the middle of an epoch costs no work (a resumable checkpoint comes before the one
error line, and the rerun ends bit-identical to a run that never failed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tracks import assert_same_run

from projector_kd.engine.checkpoint import load_checkpoint


@pytest.fixture
def data(track, tmp_path) -> Path:
    """A private, writable copy of the track's images."""
    return shutil.copytree(track.images, tmp_path / "data")


def test_hidden_folders_are_not_classes(track, tmp_path, data):
    for split in ("train", "val"):
        shutil.copytree(data / split / "class0", data / split / ".ipynb_checkpoints")
    track.train(tmp_path / "run", data=data)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["val_top1_per_epoch"]) == 1
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    # the hidden copies not counted: accuracy is a multiple of 100 / the number of validation images
    correct = metrics["top1"] * track.val_images / 100
    assert round(correct, 6) == round(correct)


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_class_folder_is_caught_before_any_work(track, tmp_path, data, one_error_line, split):
    empty = data / split / "class2"
    for image in empty.iterdir():
        image.unlink()
    assert one_error_line(track.run(track.argv(tmp_path / "run", data=data))) == (
        f"error: class folder {empty} holds no images (.jpg, .jpeg, .png, .ppm, ...) — add images or remove the folder"
    )
    assert not (tmp_path / "run").exists()


def test_val_classes_differing_from_train_are_caught_before_any_work(track, tmp_path, data, one_error_line):
    (data / "val" / "class2").rename(data / "val" / "class9")
    assert one_error_line(track.run(track.argv(tmp_path / "run", data=data))) == (
        f"error: classes of {data / 'val'} differ from {data / 'train'}: missing ['class2'], "
        f"extra ['class9'] — both splits need the same class folders"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("folder, index", [("class2", 1), ("class0", 2)])
def test_empty_image_is_caught_before_any_work(track, tmp_path, data, one_error_line, folder, index):
    empty = sorted((data / "val" / folder).iterdir())[index]
    empty.write_bytes(b"")
    assert one_error_line(track.run(track.argv(tmp_path / "run", data=data))) == (
        f"error: image {empty} is empty (0 bytes) — replace or delete it, or set on_bad_image: skip"
    )
    assert not (tmp_path / "run").exists()


def test_corrupt_image_is_named_with_fail(track, tmp_path, data, one_error_line):
    bad = track.first_image_of_batch(data, 1)  # after a trained step: a checkpoint is written first
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    line = one_error_line(track.run(track.argv(tmp_path / "run", data=data)))
    assert line.startswith(f"error: unreadable image {bad} (UnidentifiedImageError: ")
    assert "— fix or delete the file, or set on_bad_image: skip. A resumable checkpoint was written first: " in line


def test_corrupt_image_is_skipped_and_counted_with_skip(track, tmp_path, data, caplog):
    bad = track.first_image_of_batch(data, 1)  # one the seeded run reads (drop_last may leave some out)
    bad.write_bytes(b"")
    track.train(tmp_path / "run", data=data, skip_bad_images=True)
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert len(skips) == 1 and str(bad) in skips[0] and skips[0].endswith("(1 skipped so far in this process)")
    assert f"skipping unreadable image {bad}" in (tmp_path / "run" / "log.txt").read_text()


def test_image_unreadable_mid_epoch_costs_no_work(track, tmp_path, data, break_image_on_read, one_error_line):
    straight, output = tmp_path / "straight", tmp_path / "run"
    track.train(straight, data=data)

    broken = break_image_on_read(2 * track.batch_size + 2, b"not an image any more")  # in the 3rd batch
    line = one_error_line(track.run(track.argv(output, data=data)))
    assert line.startswith(f"error: unreadable image {broken.path} (UnidentifiedImageError")
    assert "— fix or delete the file, or set on_bad_image: skip. A resumable checkpoint was written first: " in line
    assert line.endswith(
        f"A resumable checkpoint was written first: {output / 'checkpoint.pth'} (epoch 0, step 2) — after fixing the "
        f"file, run the same command again to continue"
    )
    saved = load_checkpoint(output / "checkpoint.pth")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 2, 2)

    broken.repair()
    resumed = track.train(output, data=data)
    assert f"resuming from {output / 'checkpoint.pth'} at epoch 0 step 2" in resumed.stdout
    assert "resuming from" in (output / "log.txt").read_text()
    saved = load_checkpoint(output / "checkpoint.pth")
    assert (saved["epoch"], saved["global_step"]) == (1, track.steps_per_epoch)
    assert_same_run(straight, output)
