"""A failed start never blocks the corrected rerun: it records nothing in the run folder (and a folder holding a
config but no checkpoint is not another run)."""

from __future__ import annotations

import pytest
import torch
import yaml

from deit.main import main
from projector_kd.engine.errors import UserError


def test_rerun_with_the_right_teacher_after_a_missing_one(tmp_path, train_argv, teacher_ckpt):
    output = tmp_path / "run"
    argv = train_argv(output, "--epochs", "1")
    missing = tmp_path / "no-such-teacher.pth"
    with pytest.raises(UserError, match="no-such-teacher.pth"):
        main([*argv, "--teacher-ckpt", str(missing)])
    assert not (output / "config.yaml").exists() and not (output / "checkpoint.pth").exists()

    assert main([*argv, "--teacher-ckpt", str(teacher_ckpt)]) == 0
    assert yaml.safe_load((output / "config.yaml").read_text())["teacher"]["ckpt"] == str(teacher_ckpt)
    assert torch.load(output / "checkpoint.pth", weights_only=True)["epoch"] == 1
