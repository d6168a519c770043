"""Under torchrun: an error on one rank ends every rank with that one line (exit 2 for each worker), not with a
backend traceback from the ranks that were waiting for it; a stop on one rank stops all and resumes exactly."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from deit.config import load_config
from projector_kd.engine.data import CheckedImageFolder
from projector_kd.engine.sampling import ResumableSampler
from projector_kd.engine.signals import EXIT_STATUS_STOPPED


def test_unreadable_image_on_one_rank_ends_both_ranks_with_one_line(
    tmp_path, train_argv, run_torchrun, data_copy, tiny_config
):
    data = data_copy
    # the first image of rank 1's second batch: rank 1 fails mid-epoch while rank 0 waits in the gradient all-reduce
    images = CheckedImageFolder(data / "train")
    sampler = ResumableSampler(len(images), 4, load_config("demo", str(tiny_config))["seed"], rank=1, world_size=2)
    bad = Path(images.samples[sampler.epoch_indices(0)[4]][0])
    bad.write_bytes(b"not an image")
    result = run_torchrun("deit/main.py", *train_argv(tmp_path / "run", "--epochs", "1", data=data))
    assert result.returncode == 1  # torchrun's own status for any failed worker
    errors = [line for line in result.stderr.splitlines() if "error: " in line and "ChildFailedError" not in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(rf"error: unreadable image {re.escape(str(bad))} \(UnidentifiedImageError", errors[0])
    assert "gloo" not in result.stderr and "[rank0]: Traceback" not in result.stderr
    assert "[rank1]: Traceback" not in result.stderr
    # each worker exits 2, unless torchrun's SIGTERM to the workers still running reaches it first
    codes = re.findall(r"exitcode  : (-?\d+)", result.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]


def test_stop_on_one_rank_stops_both_and_resumes_bit_identical(tmp_path, train_argv, run_torchrun, sigterm_on_one_rank):
    """Two gloo ranks, 4 steps per epoch; only rank 1 gets SIGTERM: the ranks' vote stops both at the same step, the
    checkpoint holds both ranks' random streams, and the resumed run ends bit-identical to an uninterrupted one."""
    script = sigterm_on_one_rank("projector_kd.engine.loop", "deit.main")
    straight = run_torchrun("deit/main.py", *train_argv(tmp_path / "straight", "--epochs", "2"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_torchrun(script, "1", "1", "2", *train_argv(tmp_path / "interrupted", "--epochs", "2"))
    assert stopped.returncode == 1, stopped.stderr[-3000:]  # torchrun's status when a worker exits non-zero
    # each worker exits 3 (stopped), unless torchrun's SIGTERM after the first one's exit reaches it first
    codes = re.findall(r"exitcode  : (-?\d+)", stopped.stderr)
    assert str(EXIT_STATUS_STOPPED) in codes and set(codes) <= {str(EXIT_STATUS_STOPPED), "-15"}, stopped.stderr[-3000:]
    checkpoint = tmp_path / "interrupted" / "checkpoint.pth"
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1 and state["step_in_epoch"] in (2, 3)  # at once, or one step later through the vote
    assert [line for line in stopped.stderr.splitlines() if line.startswith("stopped: ")] == [
        f"stopped: stopped by a signal to another process of the run at epoch 1 step {state['step_in_epoch']}; "
        f"resumable checkpoint {checkpoint} — rerun the same command to continue"
    ]  # printed once, by rank 0, which did not receive the signal itself
    assert len(state["rng"]) == 2
    resumed = run_torchrun("deit/main.py", *train_argv(tmp_path / "interrupted", "--epochs", "2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "checkpoint.pth", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state_a in a["optimizer"]["state"].items():
        for name, value in state_a.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"]))
    assert (a["epoch"], a["global_step"], a["history"]) == (b["epoch"], b["global_step"], b["history"])
