"""DeiT-track lines that used to mislead: ``--resume`` with a run folder (its checkpoint.pth is used), and the line for
missing data, which offers ``IMAGENET_ROOT`` only where the recipe reads it (``data.path: null``)."""

from __future__ import annotations

import os


def test_resume_accepts_a_run_folder(tmp_path, train_argv, cli):
    first = tmp_path / "first"
    assert cli(train_argv(first, "--epochs", "1"))[0] == 0
    second = tmp_path / "second"
    status, err = cli(train_argv(second, "--epochs", "2", "--resume", first))
    assert status == 0, err
    assert f"resuming from {first / 'checkpoint.pth'} at epoch 1 step 0" in (second / "log.txt").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    status, err = cli(train_argv(tmp_path / "third", "--epochs", "2", "--resume", empty))
    assert (status, err.strip()) == (
        2,
        f"error: folder {empty} holds no checkpoint.pth to resume from — pass a run folder or a checkpoint file",
    )


def test_the_missing_data_line_offers_imagenet_root_only_where_it_is_read(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path / "imagenet"))
    status, err = cli(["--model", "demo", "--train_student", "--device", "cpu"])  # the demo recipe: data/digits
    assert (status, err.strip()) == (
        2,
        "error: dataset folder data/digits does not exist — expected data/digits/train/<class>/<image> and "
        "data/digits/val/<class>/<image>; pass --data-path DIR",
    )
    status, err = cli(["--model", "tiny", "--train_student", "--device", "cpu"])  # data.path: null
    imagenet = os.path.join(tmp_path, "imagenet")
    assert (status, err.strip()) == (
        2,
        f"error: dataset folder {imagenet} does not exist — expected {imagenet}/train/<class>/<image> and "
        f"{imagenet}/val/<class>/<image>; pass --data-path DIR or set IMAGENET_ROOT",
    )
