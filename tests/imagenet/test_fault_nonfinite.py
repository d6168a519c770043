"""A non-finite loss stops the run with one line naming the step and the term, and never overwrites the last good
checkpoint."""

from __future__ import annotations

import re

import torch

from imagenet import registry
from projector_kd.engine.checkpoint import load_checkpoint


def test_nan_kd_term_names_step_and_term_and_keeps_the_checkpoint(
    make_recipe, teacher_ckpt, cli, tmp_path, monkeypatch
):
    recipe = make_recipe("nan", teacher_ckpt=teacher_ckpt, epochs=2)
    out = tmp_path / "nan"
    real_kd_loss = registry.kd_loss
    snapshot = {}

    def kd_loss(student_logits, teacher_logits, temperature=1.0):
        value = real_kd_loss(student_logits, teacher_logits, temperature)
        snapshot["calls"] = snapshot.get("calls", 0) + 1
        if snapshot["calls"] == 4:  # epoch 1, step 1 of 3
            snapshot["checkpoint"] = (out / "checkpoint.pth").read_bytes()
            snapshot["best"] = (out / "best.pth").read_bytes()
            return value * float("nan")
        return value

    monkeypatch.setattr(registry, "kd_loss", kd_loss)
    status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(
        r"error: non-finite loss at epoch 1 step 1/3 \(global step 4\): term\(s\) projector_kd, projector_kd.kd went "
        r"non-finite \[ce = [0-9.]+; projector_kd = nan \(projector_kd.feature = [0-9.]+, projector_kd.kd = nan\)\]; "
        r"this step's update was not applied and nothing was written for it — the last good checkpoint \S+ is intact; "
        r"lower the learning rate \(or turn off fp16 mixed precision\) or check the data",
        lines[0],
    ), lines[0]
    assert f"the last good checkpoint {out / 'checkpoint.pth'} is intact" in lines[0]
    assert (out / "checkpoint.pth").read_bytes() == snapshot["checkpoint"]
    assert (out / "best.pth").read_bytes() == snapshot["best"]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
    assert not (out / "metrics.json").exists()


def test_nan_teacher_weights_stop_at_the_first_step(make_recipe, tiny_models, cli, tmp_path):
    broken = tiny_models(2).state_dict()
    broken["layer3.0.conv2.weight"] = torch.full_like(broken["layer3.0.conv2.weight"], float("nan"))
    torch.save({"model": broken}, tmp_path / "nan_teacher.pth")
    status, _, err = cli("--config", make_recipe("nan", teacher_ckpt=tmp_path / "nan_teacher.pth"), "--seed", "0")
    assert status == 2
    assert err.strip().splitlines() == [
        "error: non-finite loss at epoch 0 step 1/3 (global step 1): the projector feature term got non-finite values "
        "(NaN or inf) in the student or teacher features; this step's update was not applied and nothing was written "
        "for it"
    ]
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()
