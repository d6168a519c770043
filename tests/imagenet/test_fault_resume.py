"""Exact resume: a run stopped by SIGTERM mid-epoch (or at the last step of an epoch) and resumed ends bit-identical to
an uninterrupted run — student, projector, optimizer, scheduler, position, RNG streams, best accuracy — with
num_workers 0 and 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from projector_kd.checkpoint import atomic_save, load_checkpoint
from projector_kd.data import CheckedImageFolder
from projector_kd.signals import EXIT_STATUS_STOPPED


@pytest.mark.parametrize(
    "num_workers, epoch, step",
    [(0, 0, 2), (0, 0, 3), (2, 1, 1)],
    ids=["workers0-mid-epoch", "workers0-last-step", "workers2-mid-epoch"],
)
def test_stopped_and_resumed_run_is_bit_identical(
    make_recipe, teacher_ckpt, cli, tmp_path, straight_and_stopped, same_run, num_workers, epoch, step
):
    # dropout: the student's forward draws random numbers, so the generators must be restored, not just replayed
    recipe = make_recipe("resume", teacher_ckpt=teacher_ckpt, epochs=2, num_workers=num_workers, student_dropout=0.2)
    common = ("--config", recipe, "--seed", "0")
    stopped, err = straight_and_stopped(epoch, step, *common)
    checkpoint = tmp_path / "interrupted" / "checkpoint.pth"
    assert err.strip().splitlines()[-1] == (
        f"stopped: stopped by SIGTERM at epoch {epoch} step {step}; resumable checkpoint {checkpoint} — rerun the "
        f"same command to continue"
    )
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (epoch, step, 3 * epoch + step)
    assert not (tmp_path / "interrupted" / "metrics.json").exists()

    status, out, err = cli(*common, "--output_dir", tmp_path / "interrupted")
    assert status == 0, err
    assert f"resuming from {checkpoint} at epoch {epoch} step {step}" in out
    same_run(tmp_path / "straight", tmp_path / "interrupted")


def test_fast_path_stopped_and_resumed_is_bit_identical(
    make_recipe, teacher_ckpt, cli, tmp_path, monkeypatch, straight_and_stopped, same_run
):
    """Fused SGD, values read a step late: the stop's checkpoint holds the state after the last applied step."""
    monkeypatch.setattr("torch.compile", lambda module, *args, **kwargs: module)  # 2 CPU cores: eager
    recipe = make_recipe("resume", teacher_ckpt=teacher_ckpt, epochs=2, student_dropout=0.2)
    common = ("--config", recipe, "--seed", "0", "--fast")
    stopped, _ = straight_and_stopped(1, 2, *common)
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 2, 5)
    assert all(group["fused"] for group in stopped["optimizer"]["param_groups"])
    status, _, err = cli(*common, "--output_dir", tmp_path / "interrupted")
    assert status == 0, err
    same_run(tmp_path / "straight", tmp_path / "interrupted")


def test_resumed_epoch_reads_only_the_batches_it_trains(
    make_recipe, teacher_ckpt, cli, tmp_path, monkeypatch, sigterm_before
):
    """Resuming at step 2 of a 3-step epoch reads the 8 images of the last batch only (no decoding to skip), and a
    checkpoint of the earlier layout (``epoch_rng``, batches replayed) resumes with one warning line."""
    recipe = make_recipe("resume", teacher_ckpt=teacher_ckpt, epochs=2, num_workers=0)
    common = ("--config", recipe, "--seed", "0")
    with monkeypatch.context() as patch:
        sigterm_before(patch, 1, 2)
        status, _, err = cli(*common, "--output_dir", tmp_path / "run")
    assert status == EXIT_STATUS_STOPPED, err
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    stopped = load_checkpoint(checkpoint)
    assert "epoch_rng" not in stopped

    reads = []
    real_getitem = CheckedImageFolder.__getitem__

    def getitem(self, index):
        reads.append(Path(self.root).name)
        return real_getitem(self, index)

    with monkeypatch.context() as patch:
        patch.setattr(CheckedImageFolder, "__getitem__", getitem)
        status, out, err = cli(*common, "--output_dir", tmp_path / "run")
    assert status == 0, err
    assert "at epoch 1 step 2" in out
    assert reads.count("train") == 8  # one batch of 8: the two trained batches were not read again
    assert "earlier version" not in out + err

    atomic_save({**stopped, "epoch_rng": stopped["rng"]}, checkpoint)
    (tmp_path / "run" / "best.pth").unlink()
    status, out, err = cli(*common, "--output_dir", tmp_path / "run")
    assert status == 0, err
    warnings = [line for line in (out + err).splitlines() if "written by an earlier version" in line]
    assert len(warnings) == 1 and "epoch 1 continues at step 2" in warnings[0] and str(checkpoint) in warnings[0]
    assert load_checkpoint(checkpoint)["epoch"] == 2
