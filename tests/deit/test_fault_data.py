"""Data faults: an empty image file is caught before any work (an image unreadable in the middle of an epoch, for both
tracks: tests/projector_kd/both_tracks/test_data.py)."""

from __future__ import annotations

import pytest

from deit.main import main
from projector_kd.engine.data import DataError


def test_empty_image_is_caught_before_any_work(tmp_path, train_argv, data_copy):
    empty = data_copy / "val" / "class2" / "1.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as error:
        main(train_argv(tmp_path / "out", "--epochs", "1", data=data_copy))
    assert str(error.value) == f"image {empty} is empty (0 bytes) — replace or delete it, or set on_bad_image: skip"
    assert not (tmp_path / "out").exists()
