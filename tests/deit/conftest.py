"""Shared fixtures for the DeiT track tests: a tiny ImageFolder, a tiny recipe and a random teacher checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 3
TEACHER = "resnet10t"


@pytest.fixture
def child_env(child_env: dict[str, str]) -> dict[str, str]:
    """The suite's environment for child processes, with this checkout first on ``PYTHONPATH``."""
    return {**child_env, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def cli(run_main):
    """``cli(argv)`` -> ``(exit status, stderr)``: ``deit/main.py`` in this process through ``run_cli`` (exactly what
    the script runs)."""
    from deit.main import main

    def run(argv: list[str]) -> tuple[int, str]:
        result = run_main(main, argv)
        return result.returncode, result.stderr

    return run


@pytest.fixture
def repo() -> Path:
    return REPO


def write_image_folder(root: Path, train_per_class: int = 12, val_per_class: int = 4, size: int = 16) -> Path:
    """Class c images: noise around a class-specific colour, so a few steps can learn them."""
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(NUM_CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(colours[label] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"))


def save_teacher(path: Path) -> Path:
    """A randomly initialised (seeded) ``resnet10t`` teacher for the tiny recipe, saved at ``path``."""
    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER, num_classes=NUM_CLASSES)
    torch.save({"model": teacher.state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth")


TINY_RECIPE = {
    "model": {
        "num_classes": NUM_CLASSES,
        "img_size": 16,
        "embed_dim": 16,
        "depth": 2,
        "num_heads": 2,
        "stem_channels": 8,
        "stem_stride": 2,
        "patch_size": 2,
        "drop_path": 0.1,
    },
    "teacher": {"name": TEACHER},
    "data": {"batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
    "aug": {
        "mixup": 0.8,
        "cutmix": 1.0,
        "rand_augment": "rand-m9-mstd0.5-inc1",
        "color_jitter": 0.4,
        "reprob": 0.25,
        "hflip": 0.5,
    },
    "train": {"epochs": 2, "warmup_epochs": 1, "base_lr": 1.0e-3, "lr_scale_batch": 4, "save_freq": 1, "log_freq": 1},
}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """A recipe overlay over configs/deit/demo.yaml: 16 px, dim 16, depth 2, batch 4, 2 epochs, full augmentation."""
    return write_tiny_config(tmp_path_factory.mktemp("config") / "tiny.yaml")


def write_tiny_config(path: Path) -> Path:
    """:data:`TINY_RECIPE` written as a recipe overlay at ``path``."""
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


@pytest.fixture
def data_copy(tmp_path: Path, image_folder: Path) -> Path:
    """A copy of the tiny ImageFolder that a test may damage."""
    return shutil.copytree(image_folder, tmp_path / "data")


@pytest.fixture
def train_argv(tiny_config: Path, image_folder: Path, teacher_ckpt: Path):
    """``train_argv(output, *extra, data=image_folder)`` -> CLI arguments training the tiny recipe on ``data`` into
    ``output``."""

    def build(output: Path, *extra: str, data: Path = image_folder) -> list[str]:
        return [
            "--model",
            "demo",
            "--train_student",
            "--config",
            str(tiny_config),
            "--data-path",
            str(data),
            "--output",
            str(output),
            "--teacher-ckpt",
            str(teacher_ckpt),
            "--device",
            "cpu",
            *extra,
        ]

    return build


@pytest.fixture
def eval_argv(tiny_config: Path, image_folder: Path):
    """``eval_argv(ckpt, output, data=image_folder)`` -> CLI arguments evaluating ``ckpt`` with the tiny recipe on
    ``data`` into ``output``."""

    def build(ckpt: Path, output: Path, data: Path = image_folder) -> list[str]:
        return [
            "--model",
            "demo",
            "--config",
            str(tiny_config),
            "--ckpt",
            str(ckpt),
            "--data-path",
            str(data),
            "--output",
            str(output),
            "--device",
            "cpu",
        ]

    return build
