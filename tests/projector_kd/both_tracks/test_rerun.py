"""A failed start never blocks the corrected rerun, through both entry points: a missing teacher records nothing in
the run folder, and a folder holding a config but no checkpoint (a teacher that made the first step's loss non-finite)
is not another run."""

from __future__ import annotations

import torch
import yaml

from projector_kd.engine.checkpoint import load_checkpoint


def test_rerun_with_the_right_teacher_after_a_missing_one(track, tmp_path, one_error_line):
    output = tmp_path / "run"
    missing = tmp_path / "no-such-teacher.pth"
    assert "no-such-teacher.pth" in one_error_line(track.run([*track.argv(output), track.teacher_flag, missing]))
    assert not (output / "config.yaml").exists() and not (output / "checkpoint.pth").exists()

    track.train(output)
    assert track.recorded_teacher(yaml.safe_load((output / "config.yaml").read_text())) == str(track.teacher)
    assert load_checkpoint(output / "checkpoint.pth")["epoch"] == 1


def test_rerun_with_a_fixed_teacher_after_a_failed_first_step(track, tmp_path):
    output = tmp_path / "run"
    saved = torch.load(track.teacher, weights_only=True)
    saved["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in saved["model"].items()}
    torch.save(saved, tmp_path / "nan_teacher.pth")
    failed = track.run([*track.argv(output), track.teacher_flag, tmp_path / "nan_teacher.pth"])
    assert failed.returncode == 2 and f"non-finite loss at epoch 0 step 1/{track.steps_per_epoch}" in failed.stderr
    assert (output / "config.yaml").is_file() and not (output / "checkpoint.pth").exists()

    track.train(output)
    assert track.recorded_teacher(yaml.safe_load((output / "config.yaml").read_text())) == str(track.teacher)
    assert load_checkpoint(output / "checkpoint.pth")["epoch"] == 1
