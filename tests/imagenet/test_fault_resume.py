"""Exact resume of the ResNet track's gradient accumulation windows, and its checkpoints of the earlier layout (the
stops both tracks share, and what a resumed epoch reads: tests/projector_kd/both_tracks/test_resume.py)."""

from __future__ import annotations

import pytest

from projector_kd.engine.checkpoint import atomic_save, load_checkpoint


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast-path"])
@pytest.mark.parametrize("epoch, step", [(0, 1), (0, 3)], ids=["mid-epoch", "epoch-end"])
def test_stop_inside_an_accumulation_window_resumes_bit_identical(
    make_recipe, teacher_ckpt, cli, tmp_path, monkeypatch, straight_and_stopped, same_run, epoch, step, fast
):
    """Two micro-batches per optimizer step over 3-step epochs: global steps 1 and 3 (the end of epoch 0) fall inside
    a window. The checkpoint holds the gradients accumulated so far, so the resumed window steps as the straight one."""
    monkeypatch.setattr("torch.compile", lambda module, *args, **kwargs: module)  # 2 CPU cores: eager
    recipe = make_recipe("resume", teacher_ckpt=teacher_ckpt, epochs=2, student_dropout=0.2)
    common = ("--config", recipe, "--seed", "0", *(["--fast"] if fast else []))
    common += ("--opts", "train.optimizer.grad_accum_step", "2")
    stopped, _ = straight_and_stopped(epoch, step, *common)
    assert stopped["global_step"] == step and len(stopped["accumulated_grads"]) == len(
        [p for group in stopped["optimizer"]["param_groups"] for p in group["params"]]
    )
    status, _, err = cli(*common, "--output_dir", tmp_path / "interrupted")
    assert status == 0, err
    state = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pth")
    assert state["global_step"] == 6 and "accumulated_grads" not in state  # the last window closed
    same_run(tmp_path / "straight", tmp_path / "interrupted")


def test_accumulation_checkpoint_with_other_gradients_is_refused_and_one_without_them_warns(
    make_recipe, teacher_ckpt, cli, cli_error, tmp_path, stopped_run
):
    recipe = make_recipe("resume", teacher_ckpt=teacher_ckpt, epochs=1)
    common = ("--config", recipe, "--seed", "0", "--opts", "train.optimizer.grad_accum_step", "2")
    stopped, _ = stopped_run(0, 1, tmp_path / "run", *common)
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    atomic_save({**stopped, "accumulated_grads": stopped["accumulated_grads"][:-1]}, checkpoint)
    assert cli_error(*common, "--output_dir", tmp_path / "run") == (
        f"error: checkpoint {checkpoint}: its accumulated gradients do not match this config's parameters — use "
        f"another output folder"
    )
    atomic_save({key: value for key, value in stopped.items() if key != "accumulated_grads"}, checkpoint)
    status, out, err = cli(*common, "--output_dir", tmp_path / "run")
    assert status == 0, err
    warnings = [line for line in (out + err).splitlines() if "holds no accumulated gradients" in line]
    assert len(warnings) == 1 and str(checkpoint) in warnings[0] and "global step 1, grad_accum_step 2" in warnings[0]


def test_a_checkpoint_of_the_earlier_layout_resumes_with_one_warning(
    make_recipe, teacher_ckpt, cli, tmp_path, stopped_run
):
    """A checkpoint of the earlier layout (``epoch_rng``, batches replayed) resumes with one warning line."""
    recipe = make_recipe("resume", teacher_ckpt=teacher_ckpt, epochs=2, num_workers=0)
    common = ("--config", recipe, "--seed", "0")
    stopped, _ = stopped_run(1, 2, tmp_path / "run", *common)
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    atomic_save({**stopped, "epoch_rng": stopped["rng"]}, checkpoint)
    (tmp_path / "run" / "best.pth").unlink()
    status, out, err = cli(*common, "--output_dir", tmp_path / "run")
    assert status == 0, err
    warnings = [line for line in (out + err).splitlines() if "written by an earlier version" in line]
    assert len(warnings) == 1 and "epoch 1 continues at step 2" in warnings[0] and str(checkpoint) in warnings[0]
    assert load_checkpoint(checkpoint)["epoch"] == 2
