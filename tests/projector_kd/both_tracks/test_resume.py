"""Exact resume through both entry points: a run stopped by SIGTERM mid-epoch (or at the last step of an epoch) and
resumed ends bit-identical to an uninterrupted run — student, projector, optimizer, scheduler, position, RNG streams,
best accuracy, every checkpoint and the per-epoch accuracy — with 0 and 2 loader workers, on the reference and the fast
path; a run killed while it validates an epoch keeps that epoch's training and resumes bit-identical too; a resumed
epoch reads only the batches it trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from tracks import assert_same_run

from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.data import CheckedImageFolder

LAST_STEP = -1


@pytest.mark.parametrize(
    "workers, epoch, step",
    [(0, 0, 2), (0, 0, LAST_STEP), (2, 1, 1)],
    ids=["workers0-mid-epoch", "workers0-last-step", "workers2-mid-epoch"],
)
def test_stopped_and_resumed_run_is_bit_identical(track, tmp_path, monkeypatch, workers, epoch, step):
    step = track.steps_per_epoch if step == LAST_STEP else step
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    track.train(straight, epochs=2, workers=workers)
    result = track.stopped(monkeypatch, epoch, step, interrupted, epochs=2, workers=workers)
    checkpoint = interrupted / "checkpoint.pth"
    assert result.stderr.strip().splitlines()[-1] == (
        f"stopped: stopped by SIGTERM at epoch {epoch} step {step}; resumable checkpoint {checkpoint} — rerun the "
        f"same command to continue"
    )
    stopped = load_checkpoint(checkpoint)
    position = (epoch, step, track.steps_per_epoch * epoch + step)
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == position
    assert stopped["epoch_sums"]["steps"] == step
    assert not (interrupted / "metrics.json").exists()

    resumed = track.train(interrupted, epochs=2, workers=workers)
    assert f"resuming from {checkpoint} at epoch {epoch} step {step}" in resumed.stdout
    assert_same_run(straight, interrupted)


def test_fast_path_stopped_and_resumed_is_bit_identical(track, tmp_path, monkeypatch):
    """Fused optimizer, values read a step late: the stop's checkpoint holds the state after the last applied step (its
    step counters, epoch sums and learning rate included) and resuming from it is exact."""
    monkeypatch.setattr("torch.compile", lambda module, *args, **kwargs: module)  # 2 CPU cores: eager
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    track.train(straight, epochs=2, fast=True)
    track.stopped(monkeypatch, 1, 2, interrupted, epochs=2, fast=True)
    stopped = load_checkpoint(interrupted / "checkpoint.pth")
    global_step = track.steps_per_epoch + 2
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 2, global_step)
    assert stopped["epoch_sums"]["steps"] == 2
    assert all(group["fused"] for group in stopped["optimizer"]["param_groups"])
    if track.optimizer_counts_steps:
        assert {state["step"].item() for state in stopped["optimizer"]["state"].values()} == {float(global_step)}
    track.train(interrupted, epochs=2, fast=True)
    assert_same_run(straight, interrupted)


class _Killed(BaseException):
    """Stands for the process dying (OOM killer, preemption) in the middle of a validation pass."""


def test_run_killed_during_validation_keeps_the_trained_epoch_and_resumes_exactly(track, tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    track.train(straight, epochs=2)
    engine = track.engine()
    real_validate = engine.validate
    passes = []

    def validate(self, epoch):
        passes.append(epoch)
        if len(passes) == 2:  # epoch 1's validation
            raise _Killed
        return real_validate(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "validate", validate)
        with pytest.raises(_Killed):
            track.run(track.argv(killed, epochs=2))
    assert passes == [0, 1]
    pending = load_checkpoint(killed / "checkpoint.pth")
    steps = track.steps_per_epoch
    assert (pending["epoch"], pending["step_in_epoch"], pending["global_step"]) == (1, steps, 2 * steps)
    assert pending["epoch_sums"]["steps"] == steps  # the epoch's loss means survive the restart
    assert len(pending["history"]["val_top1"]) == len(pending["history"]["train_loss"]) == 1  # epoch 0's only
    track.train(killed, epochs=2)
    assert "epoch 1 was trained before the resume: validating it" in (killed / "log.txt").read_text()
    assert_same_run(straight, killed)
    assert len(load_checkpoint(killed / "checkpoint.pth")["history"]["train_loss"]) == 2


def test_resumed_epoch_reads_only_the_batches_it_trains(track, tmp_path, monkeypatch):
    """Resuming at step 2 of epoch 1 reads the images of the batches left only (no decoding to skip)."""
    run = tmp_path / "run"
    track.stopped(monkeypatch, 1, 2, run, epochs=2)
    assert "epoch_rng" not in load_checkpoint(run / "checkpoint.pth")

    reads = []
    real_getitem = CheckedImageFolder.__getitem__

    def getitem(self, index):
        reads.append(Path(self.root).name)
        return real_getitem(self, index)

    with monkeypatch.context() as patch:
        patch.setattr(CheckedImageFolder, "__getitem__", getitem)
        resumed = track.train(run, epochs=2)
    assert "at epoch 1 step 2" in resumed.stdout
    assert reads.count("train") == (track.steps_per_epoch - 2) * track.batch_size  # the trained batches not read again
    assert "earlier version" not in resumed.stdout + resumed.stderr
