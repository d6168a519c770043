"""The number of classes is checked against the class folders before any work (hidden folders, for both tracks:
tests/projector_kd/both_tracks/test_data.py)."""

from __future__ import annotations

import pytest

from deit.main import main
from projector_kd.engine.data import DataError


def test_num_classes_differing_from_the_class_folders_is_refused_before_any_work(tmp_path, train_argv, image_folder):
    with pytest.raises(DataError) as error:
        main(train_argv(tmp_path / "run", "--opts", "model.num_classes", "5"))
    assert str(error.value) == (
        f"{image_folder / 'train'} has 3 class folders but model.num_classes = 5; set --opts "
        f"model.num_classes 3 or point --data-path at the right folder"
    )
    assert not (tmp_path / "run").exists()
