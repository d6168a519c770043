"""Output locations that cannot be used end in one line and lose nothing: an empty --output (never the current
folder), a file where the run folder should be, a read-only folder, a disk that fills while a checkpoint is saved."""

from __future__ import annotations

import os

import pytest

from deit.main import main


@pytest.mark.parametrize("value", ["", " "])
def test_empty_output_is_refused_not_the_current_folder(cli, tmp_path, train_argv, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    status, err = cli(train_argv(tmp_path / "unused") + ["--output", value])
    assert status == 2
    assert err == (
        "error: --output is empty — name the run folder, e.g. --output output/my_run (an empty path is "
        "never taken to mean the current folder)\n"
    )
    assert os.listdir(tmp_path) == []


def test_a_file_where_the_run_folder_should_be_is_refused(cli, tmp_path, train_argv):
    (tmp_path / "run").write_text("notes")
    status, err = cli(train_argv(tmp_path / "run"))
    assert status == 2
    assert err == f"error: output folder {tmp_path / 'run'} is a file — remove it or choose another output folder\n"
    assert (tmp_path / "run").read_text() == "notes"


def test_a_read_only_run_folder_is_refused_before_any_work(cli, tmp_path, train_argv, refuse_new_files):
    (tmp_path / "run").mkdir()
    refuse_new_files(tmp_path / "run")
    status, err = cli(train_argv(tmp_path / "run"))
    assert status == 2
    assert err == f"error: cannot write {tmp_path / 'run'}: Permission denied — choose a folder you can write to\n"
    assert os.listdir(tmp_path / "run") == []


def test_a_disk_that_fills_while_saving_loses_nothing(cli, tmp_path, train_argv, fill_disk):
    assert main(train_argv(tmp_path / "run", "--epochs", "1")) == 0
    before = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    fill_disk("checkpoint.pth", budget=1000)
    status, err = cli(train_argv(tmp_path / "run", "--epochs", "2", "--resume"))
    assert status == 2
    assert err == (
        f"error: cannot write {tmp_path / 'run' / 'checkpoint.pth'}: No space left on device — free disk "
        f"space or choose an output folder on another disk; the previous checkpoint.pth is intact\n"
    )
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == before
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
