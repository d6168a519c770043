"""Under torchrun: a stop on one rank inside a gradient accumulation window stops all and resumes exactly (outside
one, and an error on one rank, for both tracks: tests/projector_kd/both_tracks/test_torchrun.py)."""

from __future__ import annotations

from tracks import stopped_on_two_ranks


def test_stop_on_one_rank_inside_an_accumulation_window_resumes_bit_identical(
    make_recipe, teacher_ckpt, run_torchrun, run_entry_on_two_ranks, sigterm_on_one_rank, tmp_path, same_run
):
    """Two gloo ranks, 3 steps per epoch, two micro-batches per optimizer step. Only rank 1 gets SIGTERM: the ranks'
    vote stops both at the same step; the checkpoint holds both ranks' random streams and the open window's
    gradients, and the resumed run ends bit-identical to an uninterrupted one."""
    recipe = make_recipe("ddp", teacher_ckpt=teacher_ckpt, epochs=2, batch_size=4, student_dropout=0.2)
    args = ("--config", recipe, "--seed", "0", "--opts", "train.optimizer.grad_accum_step", "2")
    script = sigterm_on_one_rank("projector_kd.engine.loop", "imagenet.image_classification")

    straight = run_entry_on_two_ranks(*args, "--output_dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_torchrun(script, "1", "1", "2", "--device", "cpu", *args, "--output_dir", tmp_path / "interrupted")
    state = stopped_on_two_ranks(stopped, tmp_path / "interrupted" / "checkpoint.pth")
    assert state["epoch"] == 1 and state["global_step"] in (4, 5)  # at once, or one step later through the vote
    assert ("accumulated_grads" in state) == (state["global_step"] % 2 == 1)
    resumed = run_entry_on_two_ranks(*args, "--output_dir", tmp_path / "interrupted")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_run(tmp_path / "straight", tmp_path / "interrupted")
