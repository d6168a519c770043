"""Data faults through both entry points: hidden folders (names starting with a dot) are never classes; an image that
turns out unreadable in the middle of an epoch costs no work (a resumable checkpoint comes before the one error line,
and the rerun ends bit-identical to a run that never failed)."""

from __future__ import annotations

import json
import shutil

from tracks import assert_same_run

from projector_kd.engine.checkpoint import load_checkpoint


def test_hidden_folders_are_not_classes(track, tmp_path):
    data = shutil.copytree(track.images, tmp_path / "data")
    for split in ("train", "val"):
        shutil.copytree(data / split / "class0", data / split / ".ipynb_checkpoints")
    track.train(tmp_path / "run", data=data)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["val_top1_per_epoch"]) == 1
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    # the hidden copies not counted: accuracy is a multiple of 100 / the number of validation images
    correct = metrics["top1"] * track.val_images / 100
    assert round(correct, 6) == round(correct)


def test_image_unreadable_mid_epoch_costs_no_work(track, tmp_path, break_image_on_read, one_error_line):
    data = shutil.copytree(track.images, tmp_path / "data")
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
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 2)

    broken.repair()
    resumed = track.train(output, data=data)
    assert f"resuming from {output / 'checkpoint.pth'} at epoch 0 step 2" in resumed.stdout
    assert "resuming from" in (output / "log.txt").read_text()
    assert load_checkpoint(output / "checkpoint.pth")["epoch"] == 1
    assert_same_run(straight, output)
