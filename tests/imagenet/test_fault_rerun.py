"""A failed start never blocks the corrected rerun: a run folder holding a config but no checkpoint is not another
run."""

from __future__ import annotations

import torch
import yaml

from projector_kd.engine.checkpoint import load_checkpoint


def test_rerun_with_a_fixed_teacher_after_a_failed_first_step(make_recipe, tiny_models, teacher_ckpt, cli, tmp_path):
    broken = tiny_models(2).state_dict()
    broken["layer3.0.conv2.weight"] = torch.full_like(broken["layer3.0.conv2.weight"], float("nan"))
    torch.save({"model": broken}, tmp_path / "nan_teacher.pth")
    recipe = make_recipe("run")
    status, _, err = cli("--config", recipe, "--seed", "0", "--teacher_ckpt", tmp_path / "nan_teacher.pth")
    assert status == 2 and "non-finite loss at epoch 0 step 1/3" in err
    assert (tmp_path / "run" / "config.yaml").is_file() and not (tmp_path / "run" / "checkpoint.pth").exists()

    status, _, err = cli("--config", recipe, "--seed", "0", "--teacher_ckpt", teacher_ckpt)
    assert status == 0, err
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["recipe"]["models"]["teacher_model"]["src_ckpt"] == str(teacher_ckpt)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 1
