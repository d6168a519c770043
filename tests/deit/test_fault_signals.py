"""Real processes under faults: SIGTERM/SIGINT stop gracefully and resume exactly; SIGKILL mid-save loses nothing."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from deit.main import main

SLOW_SAVE_LAUNCHER = """
import io, sys, time, torch
real_save = torch.save
calls = [0]
def slow_save(obj, handle, *args, **kwargs):
    calls[0] += 1
    if calls[0] <= int(sys.argv[1]):
        return real_save(obj, handle, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    handle.write(data[: len(data) // 2])
    handle.flush()
    time.sleep(600)
torch.save = slow_save
from deit.main import main
from projector_kd.engine.cli import run_cli
run_cli(main, sys.argv[2:])
"""
SLOWER = ["--opts", "model.img_size", "48", "model.embed_dim", "32", "train.epochs", "3"]


def _final_weights(output: Path) -> dict:
    return torch.load(output / "checkpoint.pth", weights_only=True)["model"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_step_and_resume_is_exact(tmp_path, train_argv, start_python, wait_for, signum):
    output = tmp_path / "run"
    process = start_python("deit/main.py", *train_argv(output, *SLOWER))
    log = output / "log.txt"
    wait_for(lambda: log.is_file() and "train epoch 1 step 2/" in log.read_text(), process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    assert f"stopped: stopped by {signum.name} at epoch 1 step" in stderr
    stopped = torch.load(output / "checkpoint.pth", weights_only=True)
    assert stopped["epoch"] == 1 and 2 <= stopped["step_in_epoch"] <= 9
    assert main(train_argv(output, *SLOWER)) == 0
    straight = tmp_path / "straight"
    assert main(train_argv(straight, *SLOWER)) == 0
    resumed, reference = _final_weights(output), _final_weights(straight)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, train_argv, start_python, wait_for):
    output = tmp_path / "run"
    # saves 1-5 are real (epoch 0 trained: checkpoint.pth; epoch 0 validated: ckpt_epoch_0.pth, checkpoint.pth; epoch 1
    # trained: checkpoint.pth; epoch 1 validated: ckpt_epoch_1.pth); save 6 (then checkpoint.pth) hangs half-written
    process = start_python("-c", SLOW_SAVE_LAUNCHER, "5", *train_argv(output, *SLOWER))
    wait_for(
        lambda: any(output.glob(".checkpoint.pth.*.tmp")) and "epoch 1: val top-1" in (output / "log.txt").read_text(),
        process,
    )
    time.sleep(0.2)
    process.kill()
    process.communicate(timeout=60)
    [partial] = output.glob(".checkpoint.pth.*.tmp")
    assert partial.stat().st_size > 0
    survivor = torch.load(output / "checkpoint.pth", weights_only=True)
    assert (survivor["epoch"], survivor["step_in_epoch"]) == (1, 9)  # epoch 1 trained, its validation not recorded
    assert main(train_argv(output, *SLOWER)) == 0  # auto-resumes from the surviving checkpoint
    assert not any(output.glob(".checkpoint.pth.*.tmp"))
    assert "epoch 1 was trained before the resume: validating it" in (output / "log.txt").read_text()
    straight = tmp_path / "straight"
    assert main(train_argv(straight, *SLOWER)) == 0
    resumed, reference = _final_weights(output), _final_weights(straight)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
