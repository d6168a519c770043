"""Shared fixtures for the DeiT track tests: its tiny ImageFolder, recipe and random teacher (from ``tracks``) and its
command lines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tracks import deit_train_argv

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="session")
def image_folder(deit_images: Path) -> Path:
    """The DeiT track's tiny ImageFolder (:func:`tracks.write_deit_images`)."""
    return deit_images


@pytest.fixture(scope="session")
def teacher_ckpt(deit_teacher: Path) -> Path:
    return deit_teacher


@pytest.fixture(scope="session")
def tiny_config(deit_config: Path) -> Path:
    """:data:`tracks.DEIT_RECIPE` as a recipe overlay."""
    return deit_config


@pytest.fixture
def data_copy(tmp_path: Path, image_folder: Path) -> Path:
    """A copy of the tiny ImageFolder that a test may damage."""
    return shutil.copytree(image_folder, tmp_path / "data")


@pytest.fixture
def train_argv(tiny_config: Path, image_folder: Path, teacher_ckpt: Path):
    """``train_argv(output, *extra, data=image_folder)`` -> CLI arguments training the tiny recipe on ``data`` into
    ``output``."""
    return lambda output, *extra, data=image_folder: deit_train_argv(tiny_config, data, teacher_ckpt, output, *extra)


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
