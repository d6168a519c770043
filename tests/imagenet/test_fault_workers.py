"""Loader workers that die or raise an unexpected error while the ResNet track trains or evaluates end the run in one
line naming what failed and what to do (exit 2). In training a resumable checkpoint at that position is written first;
an epoch's training is checkpointed before its validation. Either way the rerun of the same command goes on exactly as
an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import time

from projector_kd.engine.checkpoint import load_checkpoint


def _fail_reading_val_images(monkeypatch, how: str, from_pass: int) -> None:
    """From the ``from_pass``-th validation pass (0-based) on, a loader worker that reads a val image dies (SIGKILL)
    or raises a two-line RuntimeError. Workers are forked at each pass, so they see the pass count of that moment."""
    from imagenet import engine
    from projector_kd.engine import data as data_module

    passes = {"started": 0}
    real_evaluate, real_load = engine.evaluate_classifier, data_module.load_rgb
    parent = os.getpid()

    def evaluate_classifier(*args, **kwargs):
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            passes["started"] += 1

    def load_rgb(path):
        if os.getpid() != parent and f"{os.sep}val{os.sep}" in str(path) and passes["started"] >= from_pass:
            if how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("colour table exhausted\nsecond line of the message")
        return real_load(path)

    monkeypatch.setattr(engine, "evaluate_classifier", evaluate_classifier)
    monkeypatch.setattr(data_module, "load_rgb", load_rgb)


def test_worker_killed_during_validation_is_one_line_and_the_rerun_validates_the_trained_epoch(
    make_recipe, cli, tmp_path, monkeypatch, same_run
):
    recipe = make_recipe("run", method="baseline", epochs=2, eval_workers=1)
    status, _, err = cli("--config", recipe, "--seed", "0", "--output_dir", tmp_path / "straight")
    assert status == 0, err
    with monkeypatch.context() as patch:
        _fail_reading_val_images(patch, "killed", from_pass=1)
        status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == 2
    assert re.fullmatch(
        r"error: a data-loader worker \(pid \d+\) (exited unexpectedly|was killed by signal: Killed) while evaluating "
        r"\(val 1\) — most often the system ran out of memory and killed it: lower the number of loader workers "
        r"\(num_workers\) or the batch size, or free memory, then run the same command again\n",
        err,
    ), err
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")  # epoch 1 trained, written before its validation
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], len(state["history"]["val_top1"])) == (
        1,
        3,
        6,
        1,
    )
    assert (tmp_path / "run" / "best.pth").is_file()

    status, out, err = cli("--config", recipe, "--seed", "0")
    assert status == 0, err
    assert "epoch 1 was trained before the resume: validating it" in out
    same_run(tmp_path / "straight", tmp_path / "run")


def test_worker_killed_during_training_is_one_line_and_the_rerun_continues_exactly(
    make_recipe, cli, tmp_path, monkeypatch, same_run
):
    """Two workers, three batches of 8 per epoch: worker 0 reads batches 0 and 2 and dies at the first image of batch
    2, a second after reading it, when the main process has trained batches 0 and 1 and waits for batch 2. The model is
    intact, so it first writes a resumable checkpoint at that position; one line; the rerun of the same command ends
    exactly as an uninterrupted run. (A death noticed inside a step keeps the last checkpoint instead: the block
    around the loop names it in one line too, see tests/projector_kd/test_data.py.)"""
    from projector_kd.engine import data as data_module

    recipe = make_recipe("run", method="baseline", epochs=2, num_workers=2)
    status, _, err = cli("--config", recipe, "--seed", "0", "--output_dir", tmp_path / "straight")
    assert status == 0, err
    real_load, parent, reads = data_module.load_rgb, os.getpid(), {"count": 0}

    def load_rgb(path, *args, **kwargs):
        if os.getpid() != parent and f"{os.sep}train{os.sep}" in str(path):
            reads["count"] += 1  # this worker's own count (forked with 0)
            if reads["count"] == 9:
                time.sleep(1.0)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_load(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(data_module, "load_rgb", load_rgb)
        status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == 2
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    assert re.fullmatch(
        r"error: a data-loader worker \(pid \d+\) (exited unexpectedly|was killed by signal: Killed) while training — "
        r"most often the system ran out of memory and killed it: lower the number of loader workers \(num_workers\) "
        r"or the batch size, or free memory, then run the same command again\. A resumable checkpoint was written "
        rf"first: {re.escape(str(checkpoint))} \(epoch 0, step 2\)\n",
        err,
    ), err

    status, out, err = cli("--config", recipe, "--seed", "0")
    assert status == 0, err
    assert f"resuming from {checkpoint} at epoch 0 step 2" in out
    same_run(tmp_path / "straight", tmp_path / "run")


def test_worker_raising_during_evaluation_is_one_line_and_logged(make_recipe, cli, tmp_path, monkeypatch):
    recipe = make_recipe("run", method="baseline", eval_workers=1)
    _fail_reading_val_images(monkeypatch, "raised", from_pass=0)
    status, out, err = cli("--config", recipe, "--seed", "0")
    assert status == 2
    assert err == (
        "error: a data-loader worker raised RuntimeError: colour table exhausted while evaluating (val 0) — fix what "
        "it names (its traceback is in the log), or set num_workers to 0 to debug it in the main process\n"
    )
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "data-loader worker 0 failed while evaluating (val 0):" in log and "second line of the message" in log
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")  # epoch 0 trained, not yet validated
    assert (state["epoch"], state["step_in_epoch"], state["history"]["val_top1"]) == (0, 3, [])
    assert not (tmp_path / "run" / "best.pth").exists()
