"""Command-line values that used to end in a traceback or a misleading line: ``--start_epoch`` negative or past the
recipe's last epoch, ``-test_only -student_only`` (which needs no teacher at all), and missing data, whose line names
the environment variable the recipe reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_a_start_epoch_that_leaves_nothing_to_train_is_named_before_any_work(make_recipe, cli_error, tmp_path):
    recipe = make_recipe("run", method="baseline", epochs=3)
    assert cli_error("--config", recipe, "--start_epoch", "-1") == (
        "error: --start_epoch -1 is negative — epochs are counted from 0"
    )
    assert cli_error("--config", recipe, "--start_epoch", "3") == (
        f"error: --start_epoch 3 is past the last epoch of {recipe} (train.num_epochs = 3: epochs 0 to 2), so there is "
        "nothing to train — pass a smaller --start_epoch or raise train.num_epochs with --opts; to evaluate a "
        "checkpoint, pass -test_only"
    )
    assert not (tmp_path / "run").exists()


def test_test_only_student_only_needs_no_teacher_weights(make_recipe, cli, tmp_path, tiny_models):
    missing = tmp_path / "no-teacher.pth"
    recipe = make_recipe("run", method="projector", teacher_ckpt=missing)
    (tmp_path / "run").mkdir()
    torch.save({"model": tiny_models(1).state_dict()}, tmp_path / "run" / "best.pth")
    status, out, err = cli("--config", recipe, "-test_only", "-student_only", "--output_dir", tmp_path / "run")
    assert status == 0, err
    metrics = json.loads((tmp_path / "run" / "test_only" / "metrics.json").read_text())
    assert "teacher_top1" not in metrics and f"top1 {metrics['top1']:.2f}" in out
    status, _, err = cli("--config", recipe, "-test_only", "--output_dir", tmp_path / "run")  # the teacher evaluated
    assert status == 2 and f"checkpoint not found: {missing}" in err


def test_the_missing_data_line_names_the_variable_the_recipe_reads(cli_error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIGITS_ROOT", raising=False)
    recipe = REPO / "configs" / "demo" / "resnet_baseline.yaml"
    expected = "data/digits/train/<class>/<image> and data/digits/val/<class>/<image>"
    assert cli_error("--config", recipe) == (
        f"error: dataset folder data/digits does not exist — expected {expected}; pass --data-root DIR or set "
        "DIGITS_ROOT"
    )
    missing = tmp_path / "missing"
    assert cli_error("--config", recipe, "--data-root", missing).endswith("/<class>/<image>; pass --data-root DIR")
