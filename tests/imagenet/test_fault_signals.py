"""Process-level faults on the real script: SIGTERM (what schedulers send) finishes the step, writes a resumable
checkpoint, exits non-zero with a message, and the rerun continues exactly; SIGKILL in the middle of a real checkpoint
write leaves the previous checkpoint loadable and the rerun auto-resumes from it, exactly."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.signals import EXIT_STATUS_STOPPED

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "imagenet" / "image_classification.py"

# Runs the entry point with torch.save patched so that the second write of checkpoint.pth stops half-way through the
# temporary file (flushed to disk), announces it in a marker file and waits to be killed.
KILL_DURING_SAVE = r"""
import io, os, sys, time
from pathlib import Path
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
        if len(writes) == 2:  # epoch 0 validated (the first write: epoch 0 trained)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            marker.write_text("writing")
            time.sleep(300)
    return real_save(obj, handle, *args, **kwargs)

torch.save = save
sys.argv = [sys.argv[2]] + sys.argv[3:]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))))
from imagenet.image_classification import main
from projector_kd.engine.cli import run_cli
run_cli(main)
"""


def _entry_args(recipe: Path, out: Path) -> tuple[str | Path, ...]:
    """The entry point's command line: ``recipe`` on the CPU, seed 0, into ``out``."""
    return (ENTRY, "--device", "cpu", "--config", recipe, "--seed", "0", "--output_dir", out)


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(
    make_recipe, teacher_ckpt, start_python, cli, tmp_path, same_run
):
    recipe = make_recipe("sigterm", teacher_ckpt=teacher_ckpt, epochs=3, student_dropout=0.2)
    out = tmp_path / "interrupted"
    process = start_python(*_entry_args(recipe, out))
    for line in process.stdout:  # log_freq 1: one line per step
        if "epoch 0 step 1/3" in line:
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STATUS_STOPPED, stderr
    state = load_checkpoint(out / "checkpoint.pth")
    epoch, step = state["epoch"], state["step_in_epoch"]
    assert 3 * epoch + step == state["global_step"] and 2 <= state["global_step"] < 9
    assert stderr.strip().splitlines()[-1] == (
        f"stopped: stopped by SIGTERM at epoch {epoch} step {step}; resumable checkpoint {out / 'checkpoint.pth'} — "
        f"rerun the same command to continue"
    )
    assert "Traceback" not in stderr and not (out / "metrics.json").exists()

    status, stdout, err = cli("--config", recipe, "--seed", "0", "--output_dir", out)  # the same command again
    assert status == 0, err
    assert f"resuming from {out / 'checkpoint.pth'} at epoch {epoch} step {step}" in stdout
    status, _, err = cli("--config", recipe, "--seed", "0", "--output_dir", tmp_path / "straight")
    assert status == 0, err
    same_run(tmp_path / "straight", out)


def test_sigkill_during_checkpoint_write_keeps_previous_and_resumes(
    make_recipe, teacher_ckpt, start_python, wait_for, cli, tmp_path, same_run
):
    recipe = make_recipe("sigkill", teacher_ckpt=teacher_ckpt, epochs=2, student_dropout=0.2)
    out = tmp_path / "killed"
    marker = tmp_path / "writing"
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    process = start_python(script, marker, *_entry_args(recipe, out), stdout=subprocess.DEVNULL)
    try:
        wait_for(marker.exists, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    partial = list(out.glob(".checkpoint.pth.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # killed half-way through the new file
    previous = load_checkpoint(out / "checkpoint.pth")  # written when epoch 0's training ended, intact
    assert (previous["epoch"], previous["step_in_epoch"], previous["global_step"]) == (0, 3, 3)

    status, stdout, err = cli("--config", recipe, "--seed", "0", "--output_dir", out)
    assert status == 0, err
    assert f"resuming from {out / 'checkpoint.pth'} at epoch 0 step 3" in stdout
    assert "epoch 0 was trained before the resume: validating it" in stdout
    assert not list(out.glob(".*.tmp"))
    status, _, err = cli("--config", recipe, "--seed", "0", "--output_dir", tmp_path / "straight")
    assert status == 0, err
    same_run(tmp_path / "straight", out)
