"""Data faults: an empty image file is caught before any work; an image that turns out unreadable in the middle of an
epoch costs no work (a resumable checkpoint comes before the one error line, and the rerun ends bit-identical to a run
that never failed)."""

from __future__ import annotations

import pytest
import torch

from deit.main import main
from projector_kd.engine.data import DataError


def test_empty_image_is_caught_before_any_work(tmp_path, train_argv, data_copy):
    empty = data_copy / "val" / "class2" / "1.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as error:
        main(train_argv(tmp_path / "out", "--epochs", "1", data=data_copy))
    assert str(error.value) == f"image {empty} is empty (0 bytes) — replace or delete it, or set on_bad_image: skip"
    assert not (tmp_path / "out").exists()


def test_image_unreadable_mid_epoch_costs_no_work(tmp_path, train_argv, data_copy, break_image_on_read):
    straight = tmp_path / "straight"
    assert main(train_argv(straight, "--epochs", "1", data=data_copy)) == 0

    broken = break_image_on_read(10, b"not an image any more")  # the 10th image read: in the 3rd batch of 4
    output = tmp_path / "run"
    with pytest.raises(DataError) as error:
        main(train_argv(output, "--epochs", "1", data=data_copy))
    message = str(error.value)
    assert message.startswith(f"unreadable image {broken.path} (UnidentifiedImageError") and "\n" not in message
    assert message.endswith(
        f"A resumable checkpoint was written first: {output / 'checkpoint.pth'} (epoch 0, step 2) "
        f"— after fixing the file, run the same command again to continue"
    )
    saved = torch.load(output / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 2)

    broken.repair()
    assert main(train_argv(output, "--epochs", "1", data=data_copy)) == 0
    assert "resuming from" in (output / "log.txt").read_text()
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(output / "checkpoint.pth", weights_only=True)
    assert (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"]) == (1, 0)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
