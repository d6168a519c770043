"""Output locations that cannot be used end in one line and lose nothing: an empty --output_dir (never the
current folder), a file where a folder should be, a read-only folder, a --log path that is a folder, a disk that fills
while a checkpoint is saved."""

from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("value", ["", " "])
def test_empty_output_dir_is_refused_not_the_current_folder(make_recipe, cli, tmp_path, monkeypatch, value):
    recipe = make_recipe("run", method="baseline")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    status, _, err = cli("--config", recipe, "--output_dir", value)
    assert status == 2
    assert err == (
        "error: --output_dir is empty — name the run folder, e.g. --output_dir output/my_run (an empty "
        "path is never taken to mean the current folder)\n"
    )
    assert os.listdir(work) == [] and not (tmp_path / "run").exists()


def _only_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.rstrip("\n")


def test_a_file_where_the_run_folder_should_be_is_refused(make_recipe, cli, tmp_path):
    (tmp_path / "run").write_text("notes")
    status, _, err = cli("--config", make_recipe("run", method="baseline"))
    assert status == 2
    assert _only_line(err) == (
        f"error: output folder {tmp_path / 'run'} is a file — remove it or choose another output folder"
    )
    assert (tmp_path / "run").read_text() == "notes"


def test_a_file_in_the_way_of_a_parent_folder_is_refused(make_recipe, cli, tmp_path):
    (tmp_path / "runs").write_text("notes")
    status, _, err = cli("--config", make_recipe("run", method="baseline"), "--output_dir", tmp_path / "runs" / "a")
    assert status == 2
    assert _only_line(err) == (
        f"error: cannot write {tmp_path / 'runs' / 'a'}: Not a directory — a file is in the way "
        f"of a folder on that path: remove it or choose another folder"
    )


def test_a_read_only_run_folder_is_refused_before_any_work(make_recipe, cli, tmp_path, refuse_new_files):
    (tmp_path / "run").mkdir()
    refuse_new_files(tmp_path / "run")
    status, _, err = cli("--config", make_recipe("run", method="baseline"))
    assert status == 2
    assert _only_line(err) == (
        f"error: cannot write {tmp_path / 'run'}: Permission denied — choose a folder you can write to"
    )
    assert os.listdir(tmp_path / "run") == []


def test_a_log_path_that_is_a_folder_is_refused_before_any_work(make_recipe, cli, tmp_path):
    (tmp_path / "logs").mkdir()
    status, _, err = cli("--config", make_recipe("run", method="baseline"), "--log", tmp_path / "logs")
    assert status == 2
    assert _only_line(err) == (
        f"error: log file {tmp_path / 'logs'} is a folder — name a file, e.g. {tmp_path / 'logs' / 'output.txt'}"
    )
    assert not (tmp_path / "run").exists()


def test_a_disk_that_fills_while_saving_loses_nothing(make_recipe, cli, tmp_path, fill_disk):
    recipe = make_recipe("run", method="baseline", epochs=2)
    status, _, err = cli("--config", recipe, "--seed", "0", "--opts", "train.num_epochs", "1")
    assert status == 0, err
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("checkpoint.pth", "best.pth")}
    fill_disk("checkpoint.pth", budget=1000)
    status, _, err = cli("--config", recipe, "--seed", "0", "--resume")
    assert status == 2
    assert _only_line(err) == (
        f"error: cannot write {tmp_path / 'run' / 'checkpoint.pth'}: No space left on device — "
        f"free disk space or choose an output folder on another disk; the previous "
        f"checkpoint.pth is intact"
    )
    after = {name: (tmp_path / "run" / name).read_bytes() for name in ("checkpoint.pth", "best.pth")}
    assert after["checkpoint.pth"] == before["checkpoint.pth"]
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
