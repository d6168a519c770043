"""Config faults are rejected before any work (no output folder is created), in one line naming the key; an output
folder holding a different run's config is refused unless --resume."""

from __future__ import annotations

import pytest
import yaml

from projector_kd.engine.checkpoint import load_checkpoint


def test_unknown_key_in_the_file_is_named(make_recipe, cli_error, tmp_path):
    recipe = make_recipe("run", method="baseline")
    recipe.write_text(recipe.read_text().replace("  num_epochs: 1\n", "  num_epochs: 1\n  num_epoch: 3\n"))
    line = cli_error("--config", recipe)
    assert line == (
        f"error: {recipe}: unknown key train.num_epoch (did you mean train.num_epochs?) — "
        f"torchdistill would silently ignore it"
    )
    assert not (tmp_path / "run").exists()


def test_typo_in_the_file_is_named_not_suggested_for_a_correct_opts_key(make_recipe, cli_error, tmp_path):
    recipe = make_recipe("run", method="baseline")
    recipe.write_text(recipe.read_text().replace("  num_epochs: 1\n", "  num_epoch: 1\n"))
    line = cli_error("--config", recipe, "--opts", "train.num_epochs", "2")
    assert line == (
        f"error: {recipe}: unknown key train.num_epoch (did you mean train.num_epochs?) — "
        f"torchdistill would silently ignore it"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ["train.optimizer.kwargs.lrr", "0.1"],
            "--opts key 'train.optimizer.kwargs.lrr' is not in the config (did you mean train.optimizer.kwargs.lr?)",
        ),
        (["train.optimizer.kwargs.lr", "abc"], "{recipe}: train.optimizer.kwargs: lr must be float, got 'abc' (str)"),
        (["train.num_epochs", "two"], "{recipe}: train.num_epochs = 'two' is out of range (must be an integer >= 1)"),
        (
            ["train.optimizer.kwargs.lr", "-0.1"],
            "{recipe}: train.optimizer.kwargs: lr = -0.1 is out of range (must be > 0)",
        ),
        (
            ["train.train_data_loader.kwargs.batch_size", "0"],
            "{recipe}: train.train_data_loader.kwargs: batch_size = 0 is out of range (must be >= 1)",
        ),
    ],
    ids=["unknown-key", "wrong-type", "wrong-type-epochs", "negative-lr", "zero-batch"],
)
def test_bad_values_are_named_before_any_work(make_recipe, cli, tmp_path, opts, message):
    recipe = make_recipe("run", method="baseline")
    status, out, err = cli("--config", recipe, "--opts", *opts)
    assert status == 2
    assert err.strip().splitlines() == ["error: " + message.format(recipe=recipe)]
    assert not (tmp_path / "run").exists() and out == ""


def test_output_folder_of_another_run_is_refused_unless_resume(make_recipe, cli, tmp_path, cli_error):
    recipe = make_recipe("run", method="baseline")
    status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == 0, err
    checkpoint = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    config = (tmp_path / "run" / "config.yaml").read_text()

    line = cli_error("--config", recipe, "--seed", "0", "--opts", "train.optimizer.kwargs.lr", "0.01")
    assert line == (
        f"error: output folder {tmp_path / 'run'} holds a different run (config differs in: "
        f"recipe.train.optimizer.kwargs.lr) — choose a new output folder, or pass --resume to "
        f"continue that run with the new settings"
    )
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == checkpoint
    assert (tmp_path / "run" / "config.yaml").read_text() == config

    status, _, err = cli("--config", recipe, "--seed", "0", "--resume", "--opts", "train.num_epochs", "2")
    assert status == 0, err
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["recipe"]["train"]["num_epochs"] == 2
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 2  # continued from epoch 1
