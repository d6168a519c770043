"""Under torchrun (2 gloo ranks), through both entry points: a stop that reaches one rank stops all at the same step
and the rerun resumes bit-identical to an uninterrupted run."""

from __future__ import annotations

import re

from tracks import assert_same_run

from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.signals import EXIT_STATUS_STOPPED


def test_stop_on_one_rank_stops_both_and_resumes_bit_identical(track, run_torchrun, sigterm_on_one_rank, tmp_path):
    """Only rank 1 gets SIGTERM, before step 2 of epoch 1: the ranks' vote stops both at the same step, the checkpoint
    holds both ranks' random streams, and the resumed run ends bit-identical to an uninterrupted one."""
    script = sigterm_on_one_rank("projector_kd.engine.loop", track.module)
    straight = run_torchrun(track.script, *track.argv(tmp_path / "straight", epochs=2, ranks=2))
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_torchrun(script, "1", "1", "2", *track.argv(tmp_path / "interrupted", epochs=2, ranks=2))
    assert stopped.returncode == 1, stopped.stderr[-3000:]  # torchrun's status when a worker exits non-zero
    # each worker exits 3 (stopped), unless torchrun's SIGTERM after the first one's exit reaches it first
    codes = re.findall(r"exitcode  : (-?\d+)", stopped.stderr)
    assert str(EXIT_STATUS_STOPPED) in codes and set(codes) <= {str(EXIT_STATUS_STOPPED), "-15"}, stopped.stderr[-3000:]
    checkpoint = tmp_path / "interrupted" / "checkpoint.pth"
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1 and state["step_in_epoch"] in (2, 3)  # at once, or one step later through the vote
    assert state["global_step"] == track.two_rank_steps_per_epoch + state["step_in_epoch"]
    assert [line for line in stopped.stderr.splitlines() if line.startswith("stopped: ")] == [
        f"stopped: stopped by a signal to another process of the run at epoch 1 step {state['step_in_epoch']}; "
        f"resumable checkpoint {checkpoint} — rerun the same command to continue"
    ]  # printed once, by rank 0, which did not receive the signal itself
    assert len(state["rng"]) == 2
    resumed = run_torchrun(track.script, *track.argv(tmp_path / "interrupted", epochs=2, ranks=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "interrupted")
