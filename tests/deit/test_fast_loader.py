"""The fast path's CPU training loader through ``deit/main.py`` (``--fast``): crop-window JPEG decoding, uint8 batches
normalised and randomly erased on the device; a run stopped mid-epoch and resumed is bit-identical to a straight one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tracks import assert_same_run

from deit.main import main
from projector_kd.engine.signals import EXIT_STATUS_STOPPED


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """3 classes of 80 x 60 JPEGs (noise around a class colour): crops of 32 px and more decode at DCT scale 2."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for split, count in (("train", 12), ("val", 4)):
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(colours[label] + rng.normal(0, 40, (60, 80, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def test_fast_loader_run_stopped_and_resumed_is_bit_identical(
    tmp_path, train_argv, jpeg_folder, monkeypatch, sigterm_before
):
    monkeypatch.setattr(torch, "compile", lambda module: module)  # compiling costs a minute on 2 CPU cores
    extra = ["--fast", "--opts", "train.epochs", "1", "aug.reprob", "1.0"]
    straight = tmp_path / "straight"
    assert main(train_argv(straight, *extra, data=jpeg_folder)) == 0
    assert (
        "train: fast CPU loader (crop-window JPEG decoding, uint8 batches normalised and randomly erased on cpu)"
        in (straight / "log.txt").read_text()
    )
    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        sigterm_before(patch, 0, 5)
        assert main(train_argv(interrupted, *extra, data=jpeg_folder)) == EXIT_STATUS_STOPPED
    assert torch.load(interrupted / "checkpoint.pth", weights_only=True)["step_in_epoch"] == 5
    assert main(train_argv(interrupted, *extra, data=jpeg_folder)) == 0
    assert_same_run(straight, interrupted)
    assert len(torch.load(straight / "checkpoint.pth", weights_only=True)["history"]["train_loss"]) == 1


def test_fast_loader_off_keeps_the_recipes_loader(train_argv, jpeg_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module: module)
    run = tmp_path / "run"
    extra = ["--fast", "--opts", "train.epochs", "1", "data.fast_loader", "false"]
    assert main(train_argv(run, *extra, data=jpeg_folder)) == 0
    assert "fast CPU loader" not in (run / "log.txt").read_text()
