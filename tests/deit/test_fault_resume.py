"""A run killed while it validates an epoch keeps that epoch's training and resumes bit-identical to an uninterrupted
run (stops at a step: tests/projector_kd/both_tracks/test_resume.py)."""

from __future__ import annotations

import pytest
import torch
from tracks import assert_same_run

from deit.main import main


class _Killed(BaseException):
    """Stands for the process dying (OOM killer, preemption) in the middle of a validation pass."""


def test_run_killed_during_validation_keeps_the_trained_epoch_and_resumes_exactly(tmp_path, train_argv, monkeypatch):
    from deit import engine as entry

    straight = tmp_path / "straight"
    assert main(train_argv(straight)) == 0
    real_evaluate = entry.evaluate_student
    passes = []

    def evaluate_student(*args, **kwargs):
        passes.append(1)
        if len(passes) == 2:  # epoch 1's validation
            raise _Killed
        return real_evaluate(*args, **kwargs)

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(entry, "evaluate_student", evaluate_student)
        with pytest.raises(_Killed):
            main(train_argv(killed))
    pending = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert (pending["epoch"], pending["step_in_epoch"], pending["global_step"]) == (1, 9, 18)
    assert pending["epoch_sums"]["steps"] == 9  # the epoch's loss means survive the restart
    assert len(pending["history"]["val_top1"]) == len(pending["history"]["train_loss"]) == 1  # epoch 0's only
    assert main(train_argv(killed)) == 0
    assert "epoch 1 was trained before the resume: validating it" in (killed / "log.txt").read_text()
    assert_same_run(straight, killed)
    assert len(torch.load(killed / "checkpoint.pth", weights_only=True)["history"]["train_loss"]) == 2
