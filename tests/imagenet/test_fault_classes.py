"""The networks' number of classes is checked against the class folders before any work (hidden folders, for both
tracks: tests/projector_kd/both_tracks/test_data.py)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private, writable copy of the tiny ImageFolder."""
    return shutil.copytree(tiny_data, tmp_path / "data")


@pytest.mark.parametrize("method, key", [("baseline", "student_model"), ("teacher", "student_model")])
def test_num_classes_differing_from_the_class_folders_is_refused_before_any_work(
    make_recipe, cli, tmp_path, data, method, key
):
    status, _, err = cli("--config", make_recipe("run", method=method, data_root=data, num_classes=5))
    assert status == 2
    assert err == (
        f"error: {data / 'train'} has 3 class folders but models.{key} num_classes = 5; set --opts "
        f"models.{key}.kwargs.num_classes 3 (a teacher checkpoint must match too) or point --data-root at "
        f"the right folder\n"
    )
    assert not (tmp_path / "run").exists()
