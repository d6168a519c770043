"""The training loader keeps the recipe's own sampling settings when the entry point rebuilds it for exact resume:
``drop_last`` given to a batch sampler and a sampler ``seed`` (which sets the training order over ``--seed``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.sampling import ResumableSampler


@pytest.mark.parametrize("drop_last, steps", [(True, 3), (False, 4)])
def test_batch_sampler_recipe_trains_with_its_drop_last(make_recipe, cli, tmp_path, drop_last, steps):
    recipe = make_recipe("run", method="baseline", batch_sampler=True, drop_last=drop_last)
    status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == 0, err
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (state["epoch"], state["global_step"]) == (1, steps)  # 30 images: 8 + 8 + 8 (+ 6 without drop_last)


@pytest.mark.parametrize(
    "recipe_options, message",
    [
        (
            {"batch_sampler": True, "batch_size": 1},
            "train.train_data_loader.batch_sampler.kwargs.batch_size = 1 — training needs at least 2 images per "
            "batch per process (BatchNorm and the whitening use batch statistics)",
        ),
        (
            {"sampler_seed": -3},
            "train.train_data_loader.sampler.kwargs.seed = -3 is out of range (must be an integer >= 0)",
        ),
    ],
    ids=["batch-of-one", "negative-seed"],
)
def test_bad_sampling_values_are_named_before_any_work(make_recipe, cli, tmp_path, recipe_options, message):
    recipe = make_recipe("run", method="baseline", **recipe_options)
    status, out, err = cli("--config", recipe)
    assert (status, out) == (2, "")
    assert err == f"error: {recipe}: {message}\n"
    assert not (tmp_path / "run").exists()


def test_recipe_sampler_seed_sets_the_training_order(make_recipe, tiny_data, cli, tmp_path, train_image_in_batch):
    """The image a run with the recipe's seed 3 reads first in batch 1 is made unreadable: with --seed 0 too the run
    stops exactly there, after 1 trained step (in the order of seed 0 it is in none of the 3 batches trained)."""
    data = shutil.copytree(tiny_data, tmp_path / "data")
    bad = train_image_in_batch(data, 1, seed=3)
    files = [Path(path) for path, _ in ImageFolder(data / "train").samples]
    assert ResumableSampler(len(files), 8, seed=0).epoch_indices(0).index(files.index(bad)) // 8 == 3
    recipe = make_recipe("run", method="baseline", data_root=data, sampler_seed=3)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == 2
    assert err.startswith(f"error: unreadable image {bad} (") and err.count("\n") == 1
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 1)
