"""Under torchrun (2 gloo ranks), through both entry points: a stop that reaches one rank stops all at the same step
and the rerun resumes bit-identical to an uninterrupted run."""

from __future__ import annotations

from tracks import assert_same_run, stopped_on_two_ranks


def test_stop_on_one_rank_stops_both_and_resumes_bit_identical(track, run_torchrun, sigterm_on_one_rank, tmp_path):
    """Only rank 1 gets SIGTERM, before step 2 of epoch 1: the ranks' vote stops both at the same step, the checkpoint
    holds both ranks' random streams, and the resumed run ends bit-identical to an uninterrupted one."""
    script = sigterm_on_one_rank("projector_kd.engine.loop", track.module)
    straight = run_torchrun(track.script, *track.argv(tmp_path / "straight", epochs=2, ranks=2))
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_torchrun(script, "1", "1", "2", *track.argv(tmp_path / "interrupted", epochs=2, ranks=2))
    state = stopped_on_two_ranks(stopped, tmp_path / "interrupted" / "checkpoint.pth")
    assert state["epoch"] == 1 and state["step_in_epoch"] in (2, 3)  # at once, or one step later through the vote
    assert state["global_step"] == track.two_rank_steps_per_epoch + state["step_in_epoch"]
    resumed = run_torchrun(track.script, *track.argv(tmp_path / "interrupted", epochs=2, ranks=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "interrupted")
