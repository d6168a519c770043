"""The fast path's CPU training loader through ``imagenet/image_classification.py`` (``--fast``): the recipe's
RandomResizedCrop + flip run with crop-window decoding and the normalisation on the device; a run stopped mid-epoch and
resumed is bit-identical to a straight one; ``runtime.fast_loader: false`` and ``--loader dali`` keep their loaders."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setattr("torch.compile", lambda module, *args, **kwargs: module)  # 2 CPU cores: eager


def test_fast_loader_run_stopped_and_resumed_is_bit_identical(
    crop_recipe, jpeg_data, cli, tmp_path, straight_and_stopped, same_run
):
    recipe = crop_recipe("resume", jpeg_data, epochs=2, student_dropout=0.2)
    common = ("--config", recipe, "--seed", "0", "--fast")
    stopped, _ = straight_and_stopped(1, 2, *common)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 2)
    log = (tmp_path / "straight" / "log.txt").read_text()
    assert (
        "train.train_data_loader: fast CPU loader (crop-window JPEG decoding, uint8 batches normalised on cpu)" in log
    )
    assert "fast_loader=True" in log
    status, _, err = cli(*common, "--output_dir", tmp_path / "interrupted")
    assert status == 0, err
    same_run(tmp_path / "straight", tmp_path / "interrupted")


@pytest.mark.parametrize("extra", [(), ("--loader", "dali")], ids=["switched-off", "dali"])
def test_the_fast_loader_gives_way_to_the_recipes_loader_or_dali(crop_recipe, jpeg_data, cli, tmp_path, extra):
    recipe = crop_recipe("other", jpeg_data, epochs=1)
    if not extra:
        recipe.write_text(recipe.read_text().replace("runtime:\n  fast: false\n", "runtime:\n  fast_loader: false\n"))
    status, _, err = cli("--config", recipe, "--seed", "0", "--fast", *extra, "--output_dir", tmp_path / "run")
    assert status == 0, err
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "fast CPU loader" not in log and "fast_loader=False" in log
    assert ("DALI loader" in log) == ("dali" in extra)
