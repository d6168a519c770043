"""Under torchrun (2 gloo ranks), through both entry points: an error on one rank ends every rank with that one line
(exit 2 for each worker), not with a backend traceback from the ranks that were waiting for it; a stop that reaches
one rank stops all at the same step and the rerun resumes bit-identical to an uninterrupted run."""

from __future__ import annotations

import re
import shutil
import subprocess

from tracks import assert_same_run, stopped_on_two_ranks


def assert_ended_by_one_error(result: subprocess.CompletedProcess) -> list[str]:
    """Asserts a 2-rank run ended with exit status 2 on each worker and no backend traceback; returns its error
    lines."""
    assert result.returncode == 1  # torchrun's own status for any failed worker
    assert "gloo" not in result.stderr and "[rank0]: Traceback" not in result.stderr
    assert "[rank1]: Traceback" not in result.stderr
    # each worker exits 2, unless torchrun's SIGTERM to the workers still running reaches it first
    codes = re.findall(r"exitcode  : (-?\d+)", result.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if "error: " in line and "ChildFailedError" not in line]


def test_output_folder_refused_on_rank_0_ends_both_ranks_with_one_line(track, run_torchrun, tmp_path):
    (tmp_path / "run").write_text("notes")
    result = run_torchrun(track.script, *track.argv(tmp_path / "run", ranks=2))
    assert assert_ended_by_one_error(result) == [
        f"error: output folder {tmp_path / 'run'} is a file — remove it or choose another output folder"
    ]


def test_unreadable_image_on_one_rank_ends_both_ranks_with_one_line(track, run_torchrun, tmp_path):
    data = shutil.copytree(track.images, tmp_path / "data")
    # the first image of rank 1's second batch: rank 1 fails mid-epoch while rank 0 waits in the gradient all-reduce
    bad = track.first_image_of_batch(data, 1, rank=1, ranks=2)
    bad.write_bytes(b"not an image")
    errors = assert_ended_by_one_error(run_torchrun(track.script, *track.argv(tmp_path / "run", ranks=2, data=data)))
    assert len(errors) == 1 and re.search(
        rf"error: unreadable image {re.escape(str(bad))} \(UnidentifiedImageError", errors[0]
    )


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
