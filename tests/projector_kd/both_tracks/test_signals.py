"""Process-level faults on both real scripts: SIGTERM (what schedulers send) and SIGINT finish the step, write a
resumable checkpoint, exit with the stop status and one message, and the rerun continues exactly; SIGKILL in the middle
of a real checkpoint write leaves the previous checkpoint loadable and the rerun auto-resumes from it, exactly."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from tracks import REPO, assert_same_run

from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.signals import EXIT_STATUS_STOPPED

# Runs an entry point (module argv[2]) with torch.save patched so that the second write of checkpoint.pth (the first:
# epoch 0 trained; the second: epoch 0 validated) stops half-way through the temporary file (flushed to disk), announces
# it in a marker file (argv[1]) and waits to be killed.
KILL_DURING_SAVE = r"""
import importlib, io, os, sys, time
from pathlib import Path

sys.path.insert(0, {repo!r})
import torch

marker = Path(sys.argv[1])
real_save = torch.save
writes = []

def save(obj, handle, *args, **kwargs):
    frame = sys._getframe(1)
    while frame is not None and "path" not in frame.f_locals:  # the atomic writer holding the target path
        frame = frame.f_back
    target = Path(frame.f_locals["path"] if frame is not None else "")
    if target.name == "checkpoint.pth":
        writes.append(target)
        if len(writes) == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            marker.write_text("writing")
            time.sleep(300)
    return real_save(obj, handle, *args, **kwargs)

torch.save = save
from projector_kd.engine.cli import run_cli
run_cli(importlib.import_module(sys.argv[2]).main, sys.argv[3:])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(track, start_python, tmp_path, signum):
    out = tmp_path / "interrupted"
    process = start_python(track.script, *track.argv(out, epochs=3, slow=True))
    for line in process.stdout:  # log_freq 1: one line per step
        if "train epoch 1 step 1/" in line:
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STATUS_STOPPED, stderr
    state = load_checkpoint(out / "checkpoint.pth")
    epoch, step = state["epoch"], state["step_in_epoch"]
    assert track.steps_per_epoch * epoch + step == state["global_step"]
    assert epoch == 1 and 2 <= step <= track.steps_per_epoch  # sent once epoch 1's first step was logged
    assert stderr.strip().splitlines()[-1] == (
        f"stopped: stopped by {signum.name} at epoch {epoch} step {step}; resumable checkpoint "
        f"{out / 'checkpoint.pth'} — rerun the same command to continue"
    )
    assert "Traceback" not in stderr and not (out / "metrics.json").exists()

    resumed = track.train(out, epochs=3, slow=True)  # the same command again
    assert f"resuming from {out / 'checkpoint.pth'} at epoch {epoch} step {step}" in resumed.stdout
    track.train(tmp_path / "straight", epochs=3, slow=True)
    assert_same_run(tmp_path / "straight", out)


def test_sigkill_during_checkpoint_write_keeps_previous_and_resumes(track, start_python, wait_for, tmp_path):
    out = tmp_path / "killed"
    marker = tmp_path / "writing"
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE.format(repo=str(REPO)))
    process = start_python(script, marker, track.module, *track.argv(out, epochs=2), stdout=subprocess.DEVNULL)
    try:
        wait_for(marker.exists, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    partial = list(out.glob(".checkpoint.pth.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # killed half-way through the new file
    previous = load_checkpoint(out / "checkpoint.pth")  # written when epoch 0's training ended, intact
    spe = track.steps_per_epoch
    assert (previous["epoch"], previous["step_in_epoch"], previous["global_step"]) == (0, spe, spe)

    resumed = track.train(out, epochs=2)  # auto-resumes from the surviving checkpoint
    assert f"resuming from {out / 'checkpoint.pth'} at epoch 0 step {spe}" in resumed.stdout
    validating = "epoch 0 was trained before the resume: validating it"
    assert validating in resumed.stdout and validating in (out / "log.txt").read_text()
    assert not list(out.glob(".*.tmp"))
    track.train(tmp_path / "straight", epochs=2)
    assert_same_run(tmp_path / "straight", out)
