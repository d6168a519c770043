"""Exact resume: a run interrupted mid-epoch and resumed ends bit-identical to an uninterrupted run (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from deit.main import main
from projector_kd.engine.signals import EXIT_STATUS_STOPPED


class StopAfter:
    """Stand-in for GracefulStop whose ``requested`` turns true at the ``polls``-th poll (one poll per step)."""

    def __init__(self, polls: int) -> None:
        self.polls = polls
        self.signal_name = "test stop"

    @property
    def requested(self) -> bool:
        self.polls -= 1
        return self.polls <= 0


def _assert_same_state(a: dict, b: dict) -> None:
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb
        for name in va:
            assert torch.equal(va[name], vb[name]), (ka, name)
    for key in ("epoch", "step_in_epoch", "global_step", "best_top1", "history"):
        assert a[key] == b[key], key
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, train_argv):
    straight = tmp_path / "straight"
    assert main(train_argv(straight)) == 0
    # 9 train images/class x 3 classes = 36 / batch 4 = 9 steps per epoch; stop after step 5 of epoch 1.
    interrupted = tmp_path / "interrupted"
    assert main(train_argv(interrupted), stop=StopAfter(9 + 5)) == EXIT_STATUS_STOPPED
    stopped = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 5)
    assert main(train_argv(interrupted)) == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    _assert_same_state(a, b)
    assert (a["epoch"], a["step_in_epoch"]) == (2, 0)
    metrics_a = json.loads((straight / "metrics.json").read_text())
    metrics_b = json.loads((interrupted / "metrics.json").read_text())
    assert (
        metrics_a["val_top1_per_epoch"] == metrics_b["val_top1_per_epoch"] and len(metrics_a["val_top1_per_epoch"]) == 2
    )


def test_resume_with_loader_workers_is_bit_identical(tmp_path, train_argv):
    straight = tmp_path / "straight"
    workers = ["--opts", "data.num_workers", "2", "train.epochs", "1"]
    assert main(train_argv(straight, *workers)) == 0
    interrupted = tmp_path / "interrupted"
    assert main(train_argv(interrupted, *workers), stop=StopAfter(4)) == EXIT_STATUS_STOPPED
    assert main(train_argv(interrupted, *workers)) == 0
    _assert_same_state(
        torch.load(straight / "checkpoint.pth", weights_only=True),
        torch.load(interrupted / "checkpoint.pth", weights_only=True),
    )


def test_fast_path_with_the_release_lr_order_resumes_bit_identical(tmp_path, train_argv, monkeypatch):
    """Fused AdamW, values read a step late, lr updated after each step: the stop's checkpoint holds the state after
    the last applied step (its step counters, epoch sums and lr included) and resuming from it is exact."""
    monkeypatch.setattr(torch, "compile", lambda module: module)  # compiling costs a minute on 2 CPU cores
    extra = ["--fast", "--opts", "train.lr_after_step", "true", "train.epochs", "1"]
    straight = tmp_path / "straight"
    assert main(train_argv(straight, *extra)) == 0
    interrupted = tmp_path / "interrupted"
    assert main(train_argv(interrupted, *extra), stop=StopAfter(4)) == EXIT_STATUS_STOPPED
    stopped = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (0, 4) and stopped["epoch_sums"]["steps"] == 4
    assert {s["step"].item() for s in stopped["optimizer"]["state"].values()} == {4.0}
    assert main(train_argv(interrupted, *extra)) == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    _assert_same_state(a, b)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert a["history"]["train_loss"] == b["history"]["train_loss"] and len(a["history"]["train_loss"]) == 1


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
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(killed / "checkpoint.pth", weights_only=True)
    _assert_same_state(a, b)
    assert a["history"]["train_loss"] == b["history"]["train_loss"] and len(a["history"]["train_loss"]) == 2
    metrics_a = json.loads((straight / "metrics.json").read_text())
    metrics_b = json.loads((killed / "metrics.json").read_text())
    assert metrics_a["val_top1_per_epoch"] == metrics_b["val_top1_per_epoch"]
